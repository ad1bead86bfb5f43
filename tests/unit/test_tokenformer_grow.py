"""Growing a trained TokenFormer (`shardwright convert grow`, models/tokenformer/grow.py and launcher/convert.py):
the grown model computes the old function (preserving) or not (reference; and zero new keys with
tau = sqrt(n_total), the regression that makes tau a config field), training resumes from the grown
checkpoint with the loss the old model would have had, the optimizer moments are carried or reset,
and bad input ends with one line. Tiny models, fp32, one process (train() runs in the test process)."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launcher.checkpoint import Checkpointer, ModelState, check_complete
from launcher.cli import USER_ERROR_EXIT, main
from launcher.config import load_config
from launcher.convert import convert
from launcher.trainer import train
from models import get_model_spec
from parallel.init import materialize
from tests.conftest import REPO, TEST_VOCAB, tiny_overrides

CONFIG = REPO / "configs" / "tokenformer" / "tiny.yaml"
SMALL = ("model.dim=32", "model.n_layers=2", "model.qkv_tokens=32", "model.proj_tokens=32", "model.ffn_tokens=64",
         "train.seq_len=32", "train.steps=6", "run.stop_at_step=3")
GROW = ("--qkv-tokens", "48", "--proj-tokens", "40", "--ffn-tokens", "128")
PRESERVED_RTOL = 1e-6


pytestmark = pytest.mark.usefixtures("in_process_runs")  # train() runs in this process


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """trained(normalization): a run directory stopped at step 3 of 6 (trained once per module); copy it
    before training it further."""
    runs: dict[str, Path] = {}

    def run(normalization: str) -> Path:
        if normalization not in runs:
            runs[normalization] = tmp_path_factory.mktemp(f"source-{normalization}")
            train_run(runs[normalization], data_cache, f"model.normalization={normalization}")
        return runs[normalization]
    return run


def train_run(run_dir: Path, cache: Path, *overrides: str) -> list[float]:
    return train(load_config(CONFIG, tiny_overrides(run_dir, cache, *SMALL, *overrides)))["losses"]


def grow(source: Path, out: Path, *options: str) -> Path:
    return convert("grow", source, out, *options, log=lambda _: None)


def saved_model(run_dir: Path, **model_changes) -> torch.nn.Module:
    """The model of the run's latest checkpoint, built as train builds it (config changes: a what-if)."""
    cfg = load_config(run_dir / "config.yaml")
    with torch.device("meta"):
        model = get_model_spec("tokenformer").model_cls(dataclasses.replace(cfg.model_config(), **model_changes))
    materialize(model, torch.device("cpu"), cfg.train.seed)
    dcp.load({"model": ModelState([model])}, checkpoint_id=Checkpointer(run_dir, 1, 0).latest_dir())
    return model.eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.randint(0, TEST_VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    return model(tokens)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def saved_tensors(checkpoint: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose key starts with `prefix`, read straight from DCP."""
    state = {key: torch.empty(size) for key, size in check_complete(checkpoint)["sizes"].items()
             if key.startswith(prefix)}
    dcp.load(state, checkpoint_id=checkpoint)
    return state


@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "gelu_l2_norm"])
def test_preserving_growth_keeps_the_logits_and_the_reference_growth_does_not(tmp_path, trained, normalization):
    source = trained(normalization)
    grown = grow(source, tmp_path / "grown", *GROW)
    reference = grow(source, tmp_path / "reference", *GROW, "--mode", "reference")
    grown_cfg = load_config(grown / "config.yaml").model_config()
    assert (grown_cfg.qkv_tokens, grown_cfg.proj_tokens, grown_cfg.ffn_tokens) == (48, 40, 128)
    assert (grown_cfg.qkv_tau, grown_cfg.proj_tau, grown_cfg.ffn_tau) == (32 ** 0.5, 32 ** 0.5, 64 ** 0.5)
    old = logits(saved_model(source))
    assert relative(logits(saved_model(grown)), old) <= PRESERVED_RTOL
    # The reference code's growth changes the function, and so do zero new keys when tau = sqrt(n_total):
    # the fixed tau is what makes growth preserving. Measured: reference 0.63 (l2_norm_gelu) and 1.47
    # (gelu_l2_norm) relative, zero keys with tau = sqrt(n_total) 0.14 and 0.50.
    assert relative(logits(saved_model(reference)), old) > 0.05
    assert relative(logits(saved_model(grown, qkv_tau=0.0, proj_tau=0.0, ffn_tau=0.0)), old) > 0.05


def test_training_resumes_from_the_grown_checkpoint_with_the_loss_of_the_old_model(tmp_path, trained, data_cache):
    source = tmp_path / "source"
    shutil.copytree(trained("l2_norm_gelu"), source)
    grown = grow(source, tmp_path / "grown", *GROW)

    # Optimizer (carry): the old rows' moments and the step counts as saved, the new rows' moments zero.
    old = saved_tensors(source / "checkpoints" / "step-3", "optimizer.state.")
    new = saved_tensors(grown / "checkpoints" / "step-3", "optimizer.state.")
    assert old.keys() == new.keys()
    assert new["optimizer.state.layers.0.feed_forward.key_param_tokens.exp_avg"].shape == (128, 32)
    for key, saved in old.items():
        if saved.ndim == 0:  # a step count
            assert torch.equal(new[key], saved), key
        else:
            assert torch.equal(new[key][:len(saved)], saved) and not new[key][len(saved):].any(), key
    assert old["optimizer.state.tok_embeddings.weight.step"].item() == 3

    # The first loss after growth is the one the source run itself has at step 4: the same function on the
    # same batch (a step's loss is computed before its update).
    continued = train_run(source, data_cache, "run.stop_at_step=4")
    resumed = train(load_config(grown / "config.yaml", ["run.stop_at_step=4"]))["losses"]
    assert len(resumed) == 1 and abs(resumed[0] - continued[0]) <= PRESERVED_RTOL * continued[0]
    assert [json.loads(line)["step"] for line in (grown / "metrics.jsonl").read_text().splitlines()][0] == 4


def test_optimizer_reset_starts_adamw_afresh_and_training_resumes(tmp_path, trained):
    grown = grow(trained("l2_norm_gelu"), tmp_path / "grown", "--ffn-tokens", "128", "--optimizer", "reset")
    state = saved_tensors(grown / "checkpoints" / "step-3", "optimizer.state.")
    assert state and not any(tensor.any() for tensor in state.values())  # moments and step counts zero
    assert len(train(load_config(grown / "config.yaml", ["run.stop_at_step=5"]))["losses"]) == 2


def edited_copy(source: Path, destination: Path, **model_changes) -> Path:
    """A copy of the run whose checkpoint's meta.json (and config.yaml) say otherwise."""
    shutil.copytree(source, destination)
    meta_file = destination / "checkpoints" / "step-3" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["family"] = model_changes.pop("family", meta["family"])
    meta["model"].update(model_changes)
    meta.pop("meta_sha256")  # an edited meta.json fails its checksum; without one it is read as written
    meta_file.write_text(json.dumps(meta))
    cfg = load_config(destination / "config.yaml")
    cfg.model.args.update(model_changes)
    cfg.dump(destination / "config.yaml")
    return destination


@pytest.mark.parametrize("case, options, message", [
    ("other family", [], "holds a llm model; `convert grow` converts tokenformer checkpoints"),
    ("softmax", ["--ffn-tokens", "128"], "--mode preserving is impossible with normalization softmax"),
    ("shrink", ["--ffn-tokens", "32"], "--ffn-tokens 32 would shrink the checkpoint's tokens"),
    ("same counts", ["--ffn-tokens", "64", "--qkv-tokens", "32"], "nothing to grow"),
    ("no counts", [], "nothing to grow"),
    ("zero", ["--qkv-tokens", "0"], "--qkv-tokens 0: token counts must be positive integers"),
    ("out exists", ["--ffn-tokens", "128"], "exists; convert writes a new directory"),
    ("missing source", ["--ffn-tokens", "128"], "does not exist; pass a run directory"),
    ("not a checkpoint", ["--ffn-tokens", "128"], "is neither a run directory with a checkpoint"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, trained, capsys, case, options, message):
    source, out = trained("l2_norm_gelu"), tmp_path / "out"
    if case == "other family":
        source = edited_copy(source, tmp_path / "llm", family="llm")
    elif case == "softmax":
        source = edited_copy(source, tmp_path / "softmax", normalization="softmax")
    elif case == "out exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "missing source":
        source = tmp_path / "nowhere"
    elif case == "not a checkpoint":
        source = tmp_path / "empty"
        source.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", "grow", str(source), str(out), *options]) == USER_ERROR_EXIT
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing removed
    if case == "out exists":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
