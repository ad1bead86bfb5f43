"""MatFormer runs on a 2-process gloo world against one process (fp32, relative 1e-5): configs/matformer/tiny.yaml
shrunk, joint and sampled, at dp2, pp2 and cp2 (ring and ulysses): per-step losses and the final eval record
(eval_loss and every eval_loss_<name>). Sampled mode draws per global micro-batch, so every run keeps one
process's micro_batch_size (4 rows: 2 micro-batches a step). Negative controls: a perturbed learning rate
(joint), and sampled at dp2 with 2-row micro-batches (other rows grouped, so other draws)."""
import pytest

from tests.conftest import REPO
from tests.distributed.harness import run_world
from tests.distributed.runs import (assert_losses_differ, assert_same_eval, assert_same_losses, perturbed_lr,
                                    train_check)

TINY = REPO / "configs" / "matformer" / "tiny.yaml"
# Seconds per run: 2 layers of dim 64 (FFN 192: granularities of 24, 48, 96, 192 units), one Mix'n'Match vector.
SMALL = ("model.dim=64", "model.n_layers=2", "model.mix_n_match=[[0.25,1.0]]", "train.steps=6", "train.seq_len=32",
         "train.micro_batch_size=4")
SUBMODELS = ("g0.125", "g0.25", "g0.5", "g1", "mix0")  # what evaluation reports for SMALL
MODES = ("joint", "sampled")
ONE_RANK = ("parallel.dp_shard=1",)  # the other dimension takes both ranks
LAYOUTS = {"dp2": (), "pp2": ("parallel.pp=2", *ONE_RANK), "cp2": ("parallel.cp=2", *ONE_RANK),
           "cp2_ulysses": ("parallel.cp=2", "parallel.cp_mode=ulysses", *ONE_RANK)}
CONTROLS = {"joint_cp2_lr_perturbed": ("joint", ("parallel.cp=2", *ONE_RANK, perturbed_lr(TINY))),
            "sampled_dp2_micro_batch_2": ("sampled", ("train.micro_batch_size=2",))}


def run(workdir, cache, name: str, mode: str, *overrides: str) -> tuple[str, dict]:
    return train_check(workdir / name, cache, *SMALL, f"model.mode={mode}", *overrides, config=TINY, summary=True)


def one_process_checks(workdir, cache) -> dict:
    return {mode: run(workdir, cache, mode, mode) for mode in MODES}


@pytest.fixture(scope="module")
def one(one_process) -> dict:
    return {mode: one_process[f"test_matformer_runs:{mode}"].value() for mode in MODES}


@pytest.fixture(scope="module")
def two(tmp_path_factory, data_cache, one) -> dict:
    workdir = tmp_path_factory.mktemp("matformer")
    runs = {f"{mode}_{layout}": (mode, overrides) for mode in MODES for layout, overrides in LAYOUTS.items()}
    runs.update(CONTROLS)
    checks = [run(workdir, data_cache, name, mode, *overrides) for name, (mode, overrides) in runs.items()]
    return {name: result.value() for name, result in zip(runs, run_world(2, checks, workdir / "world2"))}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_run_matches_one_process(two, one, mode, layout):
    got = two[f"{mode}_{layout}"]
    assert_same_losses(got["losses"], one[mode]["losses"])
    assert one[mode]["eval"].keys() == {"eval_loss", *(f"eval_loss_{n}" for n in SUBMODELS)}
    assert_same_eval(got["eval"], one[mode]["eval"])


@pytest.mark.parametrize("control", CONTROLS)
def test_perturbed_run_fails_the_comparison(two, one, control):
    mode, _ = CONTROLS[control]
    assert_losses_differ(two[control]["losses"], one[mode]["losses"])
