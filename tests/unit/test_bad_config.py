"""Each bad config of issue 14 item 8 is one UserError line (exit 2 through the CLI), before anything runs."""
import collections

import pytest
import torch.distributed as dist

from launcher.cli import USER_ERROR_EXIT, main
from launcher.config import load_config, validate
from launcher.errors import UserError
from launcher.trainer import train
from tests.conftest import TINY, tiny_overrides
from tests.e2e.test_cli import tree_digest

FAULTS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def fault_report():
    yield
    print(f"\nconfig faults injected: {sum(FAULTS.values())} ({dict(FAULTS)})")


@pytest.mark.parametrize("override, message", [
    ("model.dim=0", "model section: dim=0 must be >= 1"),
    ("model.dim=-128", "model section: dim=-128 must be >= 1"),
    ("model.n_heads=0", "model section: n_heads=0 must be >= 1"),
    ("model.n_layers=0", "model section: n_layers=0 must be >= 1"),
    ("checkpoint.every=-1", "checkpoint.every=-1 must be >= 0"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last=-1 must be >= 0"),
    ("data.vocab_size=0", "data.vocab_size=0 must be >= 1"),
    ("run.max_restarts=-1", "run.max_restarts=-1 must be >= 0"),
    ("checkpoint.async_save=maybe", "checkpoint.async_save = 'maybe' should be of type bool"),
    ("train.steps=[1,", "--set 'train.steps=[1,': the value is not valid YAML"),
])
def test_bad_values(override, message):
    FAULTS["bad value"] += 1
    with pytest.raises(UserError, match=message.replace("[", r"\[")) as error:
        validate(load_config(TINY, [override]), world_size=1)
    assert "\n" not in str(error.value)


def test_async_save_is_refused_under_deepspeed():
    FAULTS["bad value"] += 1
    with pytest.raises(UserError, match="checkpoint.async_save=true needs parallel.engine=torch") as error:
        validate(load_config(TINY, ["parallel.engine=deepspeed", "checkpoint.async_save=true"]), world_size=1)
    assert "\n" not in str(error.value)


def test_bad_files(tmp_path):
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text("model:\n  dim: 128\n  dim: 64\n")
    with pytest.raises(UserError, match="is not valid YAML at line 3: key 'dim' appears twice"):
        load_config(duplicate)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"run:\n  dir: caf\xe9\n")
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 15: b.\\xe9.\); save it as UTF-8"):
        load_config(latin1)
    FAULTS["bad config file"] += 2


@pytest.mark.parametrize("damage", ["run.dir is a file", "latest is a directory", "latest is not text"])
def test_bad_run_directory(tmp_path, damage):
    run_dir = tmp_path / "run"
    if damage == "run.dir is a file":
        run_dir.write_text("")
        message = "is a file, not a directory"
    else:
        (run_dir / "checkpoints").mkdir(parents=True)
        latest = run_dir / "checkpoints" / "latest"
        if damage == "latest is a directory":
            latest.mkdir()
            message = "latest is a directory"
        else:
            latest.write_bytes(b"step-\xff\xfe")
            message = r"latest is not text \(not UTF-8\)"
    FAULTS["bad run directory"] += 1
    with pytest.raises(UserError, match=message):
        validate(load_config(TINY, [f"run.dir={run_dir}"]), world_size=1)


def test_no_processes(capsys):
    FAULTS["--nproc-per-node 0"] += 1
    assert main(["train", str(TINY), "--nproc-per-node", "0"]) == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: --nproc-per-node 0: give a number of processes >= 1\n"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_refusal_is_said_on_whichever_rank_raised_it(tmp_path, capsys, monkeypatch, rank):
    """A worker of a world started without torchrun (here rank `rank` of 2) refused: rank 0 says `error: ...`; any
    other rank says it too, naming itself, as a refusal of that rank alone would otherwise end the world with exit 2
    and no line at all."""
    FAULTS["refusal on one rank"] += 1
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    missing = tmp_path / "node-without-the-mount" / "config.yaml"
    assert main(["train", str(missing)]) == USER_ERROR_EXIT
    prefix = "" if rank == 0 else f"[rank {rank}] "
    assert capsys.readouterr().err == (f"{prefix}error: config file '{missing}' does not exist; pass a YAML file such "
                                       f"as one of the tiny.yaml files under configs/\n")


def test_under_torchrun_a_refusal_of_another_rank_alone_is_said_once_by_the_agent(tmp_path, capsys, monkeypatch):
    """Under torchrun, rank 1 records its refusal in its torchelastic error file instead of printing it (a refusal
    every rank raises is then said once, by rank 0); torchrun's side prints it, naming the rank, only when rank 0
    did not refuse too."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from launcher.torchrun import refused_line

    FAULTS["refusal on one rank, under torchrun"] += 1
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    missing = tmp_path / "node-without-the-mount" / "config.yaml"
    assert main(["train", str(missing)]) == USER_ERROR_EXIT
    assert capsys.readouterr().err == ""
    refused = ProcessFailure(local_rank=1, pid=101, exitcode=USER_ERROR_EXIT, error_file=str(error_file))
    stopped = ProcessFailure(local_rank=0, pid=100, exitcode=-15, error_file=str(tmp_path / "none.json"))
    assert refused_line({0: stopped, 1: refused}) == (f"error: config file '{missing}' does not exist; pass a YAML "
                                                      f"file such as one of the tiny.yaml files under configs/ (rank 1)")
    rank0_refused = ProcessFailure(local_rank=0, pid=100, exitcode=USER_ERROR_EXIT, error_file=str(tmp_path / "x"))
    assert refused_line({0: rank0_refused, 1: refused}) is None  # rank 0 printed it
    silent = ProcessFailure(local_rank=1, pid=101, exitcode=USER_ERROR_EXIT, error_file=str(tmp_path / "none.json"))
    assert "rank 1 refused its input without saying why" in refused_line({0: stopped, 1: silent})


MATFORMER = TINY.parents[1] / "matformer" / "tiny.yaml"  # 4 layers, granularities [0.125, 0.25, 0.5, 1]


@pytest.mark.parametrize("override, message", [
    ("model.granularities=[0.5,0.25,1]", r"granularities=\[0.5, 0.25, 1\] must be strictly increasing"),
    ("model.granularities=[0.25,0.5]", r"granularities=\[0.25, 0.5\] must end in 1 \(the full model\)"),
    ("model.granularities=[0,1]", r"granularities=\[0, 1\] must be fractions of the FFN hidden size in \(0, 1\]"),
    ("model.mix_n_match=[[0.25,0.5,1]]", r"mix_n_match\[0\]=\[0.25, 0.5, 1\] must list one granularity per layer "
                                         r"\(4 layers"),
    ("model.mix_n_match=[[0.25,0.5,0.75,1]]", r"mix_n_match\[0\] uses \[0.75\], which are not among granularities"),
    ("model.weights=[1,2]", r"weights=\[1, 2\] must be 4 non-negative numbers \(one per granularity\)"),
    ("model.weights=[true,1,1,1]", r"weights=\[True, 1, 1, 1\] must be 4 non-negative numbers"),
    ("model.mode=both", "mode='both' is not one of joint, sampled"),
    ("model.ffn_hidden_dims=[64,64,64,64]", r"ffn_hidden_dims \(per-layer FFN sizes\) is an option of the llm family"),
    # Whole units: 0.3 of the hidden size 352 is 105.6 units (the layout check).
    ("model.granularities=[0.25,0.3,0.5,1]", "0.3 of the FFN hidden size 352 is 105.6 units"),
])
def test_bad_matformer_values(override, message, tmp_path):
    FAULTS["bad matformer value"] += 1
    with pytest.raises(UserError, match=message) as error:
        validate(load_config(MATFORMER, [override, f"run.dir={tmp_path / 'run'}"]), world_size=1)
    assert "\n" not in str(error.value)


def test_bad_matformer_value_through_the_cli(tmp_path, capsys):
    """The CLI answers one line and exit 2 before any process group or run directory exists."""
    FAULTS["bad matformer value"] += 1
    run_dir = tmp_path / "run"
    assert main(["train", str(MATFORMER), "--set", "model.mode=both", "--set", f"run.dir={run_dir}"]) == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: model section: mode='both' is not one of joint, sampled\n"
    assert not dist.is_initialized() and not run_dir.exists()


DELTANET = TINY.parents[1] / "deltanet" / "tiny.yaml"


def test_fla_with_packed_documents_is_refused_before_any_process_starts(tmp_path):
    """The one fla problem the config alone decides (the rest depend on the node: the worker checks them)."""
    FAULTS["fla where it cannot run"] += 1
    with pytest.raises(UserError, match="model.backend=fla takes no document ids .* data.document_mask=false") as error:
        validate(load_config(DELTANET, ["model.backend=fla", "data.document_mask=true", f"run.dir={tmp_path / 'run'}"]),
                 world_size=1)
    assert "\n" not in str(error.value)
    validate(load_config(DELTANET, ["model.backend=fla", f"run.dir={tmp_path / 'run'}"]), world_size=1)  # the node's


@pytest.mark.usefixtures("in_process_runs")
def test_fla_on_a_node_where_it_cannot_run_is_refused_by_the_worker_before_the_first_step(tmp_path, data_cache, capsys):
    """model.backend=fla resumed on a CPU node (here: no CUDA, and no fla installed): whether fla's kernels run depends
    on the node's device and packages, which a preflight elsewhere (a Slurm login node) does not share, so the worker
    refuses once its device is known: one line, exit 2, before the first step (not a traceback from inside the op
    mid-run), the run directory untouched."""
    FAULTS["fla where it cannot run"] += 1
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, data_cache, "train.steps=1", "model.n_layers=1", "model.dim=32")
    train(load_config(DELTANET, overrides))
    before = tree_digest(run_dir)
    resumed = [*overrides, "train.steps=2", "model.backend=fla"]
    args = ["train", str(DELTANET), *(a for o in resumed for a in ("--set", o))]
    capsys.readouterr()
    assert main(args) == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err == ("error: model.backend=fla: flash-linear-attention's Triton kernels run on CUDA only, not on cpu; "
                   "set model.backend=chunked (or auto: fla where it runs, else chunked)\n"), err
    assert tree_digest(run_dir) == before
