"""parallel.engine=deepspeed's bad input: one UserError line (exit 2 through the CLI) before any process group or run
directory exists. The checks of DeepSpeed's own config need it installed (they skip without it: `make
test-extras` runs them); the others run in every environment."""
import sys

import pytest
import torch.distributed as dist

from launcher.cli import USER_ERROR_EXIT, main
from launcher.config import load_config, validate
from launcher.deepspeed_engine import deepspeed_config
from launcher.errors import UserError
from launcher.trainer import preflight
from tests.conftest import TINY

DEEPSPEED = "parallel.engine=deepspeed"


def refusal(tmp_path, *overrides: str, world_size: int = 2) -> str:
    with pytest.raises(UserError) as error:
        preflight(load_config(TINY, [f"run.dir={tmp_path / 'run'}", *overrides]), world_size)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (("parallel.engine=deepspeeed",), "parallel.engine='deepspeeed' is not one of torch, deepspeed (did you mean "
                                      "'deepspeed'?)"),
    ((DEEPSPEED, "parallel.zero_stage=4"), "parallel.zero_stage=4 is not a ZeRO stage; use 1, 2 or 3"),
    ((DEEPSPEED, "parallel.zero_stage=-1"), "parallel.zero_stage=-1 is not a ZeRO stage"),
    ((DEEPSPEED, "parallel.zero_stage=2", "parallel.offload_params=true"), "parallel.offload_params needs "
                                                                            "parallel.zero_stage=3"),
    ((DEEPSPEED, "parallel.zero_stage=0"), "parallel.zero_stage=0 (DeepSpeed without ZeRO) is not supported; use 1, "
                                           "2 or 3, or parallel.engine=torch for replicated data parallelism (DDP)"),
    ((DEEPSPEED, "parallel.tp=2"), "parallel.engine=deepspeed is data parallel only (ZeRO over all 2 ranks); "
                                   "parallel.tp=2 need parallel.engine=torch"),
    ((DEEPSPEED, "parallel.dp_replicate=2", "parallel.dp_shard=1"), "parallel.dp_replicate=2 need"),
    ((DEEPSPEED, "train.activation_checkpoint=full"), "train.activation_checkpoint=full need"),
    (("parallel.deepspeed={zero_optimization: {overlap_comm: true}}",),
     "parallel.deepspeed is only read with parallel.engine=deepspeed"),
    (("parallel.offload_params=true",), "parallel.offload_params is only read with parallel.engine=deepspeed"),
])
def test_refused_without_deepspeed_installed_or_not(tmp_path, overrides, message):
    assert message in refusal(tmp_path, *overrides)


def test_pipeline_layouts_are_refused(tmp_path):
    assert "parallel.pp=2 need parallel.engine=torch" in refusal(tmp_path, DEEPSPEED, "parallel.pp=2",
                                                                 "train.micro_batch_size=4")


def test_a_family_with_training_hooks_is_refused(tmp_path):
    moe = TINY.parents[1] / "moe" / "tiny.yaml"
    with pytest.raises(UserError, match="model family moe \\(its training hooks\\) need parallel.engine=torch"):
        validate(load_config(moe, [f"run.dir={tmp_path}", DEEPSPEED]), world_size=1)


def test_without_deepspeed_the_refusal_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importing it raises ImportError, installed or not
    assert refusal(tmp_path, DEEPSPEED) == ("parallel.engine=deepspeed needs DeepSpeed, which is not installed: "
                                            "pip install 'shardwright[deepspeed]' (or set parallel.engine=torch)")


def test_through_the_cli_nothing_starts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", str(TINY), "--set", DEEPSPEED, "--set", "parallel.zero_stage=7", "--set",
                 f"run.dir={run_dir}"]) == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: parallel.zero_stage=7 is not a ZeRO stage; use 1, 2 or 3\n"
    assert not dist.is_initialized() and not run_dir.exists()


@pytest.mark.parametrize("override, message", [
    ("{train_batch_size: 32}", "parallel.deepspeed.train_batch_size is set from train.global_batch_size; set that "
                               "instead"),
    ("{zero_optimization: {stage: 3}}", "parallel.deepspeed.zero_optimization.stage is set from parallel.zero_stage; "
                                        "set that instead"),
    ("{zero_optimization: 5}", "parallel.deepspeed.zero_optimization = 5 should be a mapping of DeepSpeed's ZeRO keys, "
                               "e.g. {reduce_bucket_size: 5e8}"),
    ("{zero_optimization: null}", "parallel.deepspeed.zero_optimization = None should be a mapping of DeepSpeed's ZeRO "
                                  "keys, e.g. {reduce_bucket_size: 5e8}"),
])
def test_keys_the_run_sets_are_refused(tmp_path, override, message):
    assert refusal(tmp_path, DEEPSPEED, f"parallel.deepspeed={override}") == message


def test_the_generated_config(tmp_path):
    cfg = load_config(TINY, [DEEPSPEED, "parallel.zero_stage=3", "parallel.offload_optimizer=true",
                             "parallel.offload_params=true", "train.micro_batch_size=2",
                             "parallel.deepspeed={zero_optimization: {overlap_comm: false}, wall_clock_breakdown: true}"])
    config = deepspeed_config(cfg, validate(cfg, world_size=2), bf16=False)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4  # 16 / (2 x 2)
    assert config["gradient_clipping"] == 1.0 and config["wall_clock_breakdown"] is True
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                           "offload_param": {"device": "cpu"}, "overlap_comm": False}


@pytest.mark.parametrize("override, message", [
    # DeepSpeed ignores unknown top-level keys; the check of the keys its parser reads does not.
    ("{steps_per_prnt: 10}", "parallel.deepspeed.steps_per_prnt is not a key DeepSpeed reads (did you mean "
                             "'steps_per_print'?)"),
    # Its sections' pydantic models refuse unknown keys themselves.
    ("{zero_optimization: {overlap_com: true}}", "parallel.deepspeed: DeepSpeed refuses the config:"),
    ("{zero_optimization: {reduce_bucket_size: -5}}", "parallel.deepspeed: DeepSpeed refuses the config:"),
])
def test_deepspeed_refuses_unknown_keys(tmp_path, override, message):
    pytest.importorskip("deepspeed")
    got = refusal(tmp_path, DEEPSPEED, f"parallel.deepspeed={override}")
    assert got.startswith(message), got


def test_known_pass_through_keys_are_accepted(tmp_path):
    pytest.importorskip("deepspeed")
    cfg = load_config(TINY, [f"run.dir={tmp_path / 'run'}", DEEPSPEED,
                             "parallel.deepspeed={wall_clock_breakdown: false, zero_optimization: "
                             "{reduce_bucket_size: 1000000}}"])
    assert preflight(cfg, 2)[1] is None  # passed; no checkpoint to resume


def test_a_checkpoint_of_another_engine_is_refused_in_one_line(tmp_path):
    """check_same_engine on meta.json records (the runs that write them: tests/distributed/test_deepspeed_engine.py);
    a checkpoint from before engines were recorded is the torch engine's."""
    from dataclasses import asdict

    from launcher.checkpoint import check_same_engine

    torch_run = load_config(TINY, [f"run.dir={tmp_path}"])
    zero2 = load_config(TINY, [f"run.dir={tmp_path}", DEEPSPEED])
    dims = validate(zero2, world_size=2)
    check_same_engine({"layout": asdict(dims)}, torch_run, dims, tmp_path)  # older checkpoints: torch's
    check_same_engine({"engine": "deepspeed-zero2", "layout": asdict(dims)}, zero2, dims, tmp_path)
    with pytest.raises(UserError, match="was saved by engine deepspeed-zero2, this run is torch; .* checkpoint.init_from="
                                        f"{tmp_path / 'deepspeed'}"):
        check_same_engine({"engine": "deepspeed-zero2", "layout": asdict(dims)}, torch_run, dims, tmp_path)
    with pytest.raises(UserError, match="was saved by engine torch, this run is deepspeed-zero2"):
        check_same_engine({"engine": "torch", "layout": asdict(dims)}, zero2, dims, tmp_path)
    with pytest.raises(UserError, match="per-rank files of 4 ranks; resume it on the same number of processes"):
        check_same_engine({"engine": "deepspeed-zero2", "layout": {**asdict(dims), "world_size": 4}}, zero2, dims,
                          tmp_path)
