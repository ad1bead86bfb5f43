"""SOLO on a 2-process gloo world against one process (fp32, relative 1e-5): configs/solo/tiny.yaml shrunk, at
dp2 (FSDP), tp2 (with and without sequence parallelism), pp2 (patches only to the first stage), cp2 ring and
cp2 Ulysses (each rank gets only its tokens' patches): per-step losses and the final eval record (eval_loss and
the greedy caption accuracies, image and blanked). Under tp2 the patch projection is column-parallel (weight
Shard(0) over tp) next to the LLM's plan. Negative controls: the same comparison rejects a cp2 run whose
patches are scaled by 1.1 (a test-only family: SOLO with its loaders' patches perturbed) and a run whose
learning rate is perturbed. With train.compile=true one process gives the eager run's losses and eval record, and
its compiled blocks never recompile during training (every micro-batch packs another number of documents)."""
from dataclasses import replace
from pathlib import Path

import pytest

from data.loader import LoaderWrapper
from models.solo import model_spec as solo
from tests.conftest import REPO, tiny_overrides
from tests.distributed.harness import run_world
from tests.distributed.runs import assert_losses_differ, assert_same_eval, assert_same_losses, perturbed_lr
from tests.distributed.sharding import assert_placed, llm_plan

THIS = "tests.distributed.test_solo_runs"
TINY = REPO / "configs" / "solo" / "tiny.yaml"
SMALL = ("model.dim=64", "model.n_layers=2", "train.steps=6", "train.micro_batch_size=4")
ONE_RANK = ("parallel.dp_shard=1",)  # the other dimension takes both ranks
LAYOUTS = {"dp2": (), "tp2": ("parallel.tp=2", *ONE_RANK),
           "tp2_no_sp": ("parallel.tp=2", "parallel.sequence_parallel=false", *ONE_RANK),
           "pp2": ("parallel.pp=2", *ONE_RANK), "cp2": ("parallel.cp=2", *ONE_RANK),
           "cp2_ulysses": ("parallel.cp=2", "parallel.cp_mode=ulysses", *ONE_RANK)}
CONTROLS = {"cp2_patches_perturbed": ("model.family=solo_perturbed", "parallel.cp=2", *ONE_RANK),
            "dp2_lr_perturbed": (perturbed_lr(TINY),)}
CAPTION_METRICS = {f"caption_{name}{blanked}" for name in ("exact", "size", "colour", "shape", "place")
                   for blanked in ("", "_blanked")}


class PerturbedPatches(LoaderWrapper):
    def micro_batches(self, step: int) -> list[dict]:
        return [{**batch, "patches": batch["patches"] * 1.1} for batch in self.loader.micro_batches(step)]


def _perturbed_loaders(*args, **kwargs):
    data, train, valid = solo.data.build_loaders(*args, **kwargs)
    return data, PerturbedPatches(train), valid


# The negative control's family (registered in the worker that runs it): SOLO whose training patches are off by 10%.
model_spec = replace(solo, name="solo_perturbed", data=replace(solo.data, build_loaders=_perturbed_loaders))


def train_solo(run_dir: str, cache: str, overrides: list[str]) -> dict:
    """Check body: a training run of the shrunk SOLO config; its per-step losses and final eval record."""
    from launcher.config import load_config
    from launcher.trainer import train
    from models import register_family

    register_family("solo_perturbed", THIS)
    summary = train(load_config(TINY, tiny_overrides(Path(run_dir), Path(cache), *SMALL, *overrides)))
    return {"losses": summary["losses"], "eval": summary["eval"]}


def train_solo_compiled(run_dir: str, cache: str, overrides: list[str]) -> dict:
    """Check body: train_solo with train.compile=true, where a recompile during a training step is an error (dynamo's
    error_on_recompile around TrainStep.train_step only: evaluation's no-grad forwards and the caption batches'
    other shapes compile graphs of their own); with the number of frames dynamo compiled in each training step."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from launcher.trainer import TrainStep

    frames_per_step = []
    plain_train_step = TrainStep.train_step

    def train_step(self, micro_batches):
        frames = counters["frames"]["total"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            record = plain_train_step(self, micro_batches)
        frames_per_step.append(counters["frames"]["total"] - frames)
        return record

    torch._dynamo.reset()  # an earlier check's compiled frames (the same block code) would make ours recompiles
    TrainStep.train_step = train_step
    try:
        result = train_solo(run_dir, cache, [*overrides, "train.compile=true"])
    finally:
        TrainStep.train_step = plain_train_step
        torch._dynamo.reset()
    return {**result, "frames_per_step": frames_per_step}


def tp_placements(sequence_parallel: bool) -> dict:
    """Check body (2 ranks): each parameter's placement after SOLO's TP plan."""
    import torch

    from models.solo.model import SOLO, SOLOConfig
    from models.solo.parallelize import apply_tensor_parallel
    from parallel.mesh import ParallelDims
    from parallel.options import ParallelizeOptions
    from tests.distributed.sharding import placements

    with torch.device("meta"):
        model = SOLO(SOLOConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=32))
    meshes = ParallelDims.resolve(tp=2, dp_shard=1, world_size=2).build_mesh("cpu")
    apply_tensor_parallel(model, meshes, ParallelizeOptions(sequence_parallel=sequence_parallel))
    return placements(model)


def check(name: str, run_dir: Path, cache: Path, *overrides: str) -> tuple[str, dict]:
    return f"{THIS}:train_solo", {"run_dir": str(run_dir / name), "cache": str(cache), "overrides": list(overrides)}


def one_process_checks(workdir: Path, cache: Path) -> dict:
    return {"tiny": check("tiny", workdir, cache),
            "tiny_compile": (f"{THIS}:train_solo_compiled", {"run_dir": str(workdir / "tiny_compile"),
                                                               "cache": str(cache), "overrides": []})}


@pytest.fixture(scope="module")
def one(one_process) -> dict:
    return one_process["test_solo_runs:tiny"].value()


@pytest.fixture(scope="module")
def two(tmp_path_factory, data_cache) -> dict:
    workdir = tmp_path_factory.mktemp("solo")
    runs = {**LAYOUTS, **CONTROLS}
    checks = [check(name, workdir, data_cache, *overrides) for name, overrides in runs.items()]
    checks += [(f"{THIS}:tp_placements", {"sequence_parallel": sp}) for sp in (True, False)]
    results = [result.value() for result in run_world(2, checks, workdir / "world2")]
    return {**dict(zip(runs, results)), "placements": dict(zip((True, False), results[len(runs):]))}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_run_matches_one_process(two, one, layout):
    assert one["eval"].keys() == {"eval_loss", *CAPTION_METRICS}
    assert_same_losses(two[layout]["losses"], one["losses"])
    assert_same_eval(two[layout]["eval"], one["eval"])


@pytest.mark.parametrize("control", CONTROLS)
def test_perturbed_run_fails_the_comparison(two, one, control):
    assert_losses_differ(two[control]["losses"], one["losses"])


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_tp_places_the_patch_projection_column_parallel(two, sequence_parallel):
    from torch.distributed.tensor import Shard

    assert_placed(two["placements"][sequence_parallel],
                  {**llm_plan(2, n_kv_heads=2, sequence_parallel=sequence_parallel), "patch_embeddings": Shard(0)})


def test_compiled_run_matches_eager(one_process, one):
    """train.compile=true on one process: inductor reorders float ops, well inside the parity bar. Building the
    C++ kernels (training, eval's no-grad forward, the caption batches) makes the run ~29 s on a cold inductor cache
    against ~5 s eager (measured with the 2 cores nearly free)."""
    compiled = one_process["test_solo_runs:tiny_compile"].value()
    assert_same_losses(compiled["losses"], one["losses"])
    assert_same_eval(compiled["eval"], one["eval"])


def test_compiled_blocks_do_not_recompile(one_process):
    """Every micro-batch packs another number of samples (documents), so attention within documents loops over a
    number of segments that changes from batch to batch. Traced, that loop made dynamo guard on the number and
    lengths of the segments and recompile the blocks for nearly every micro-batch, until its recompile limit (8)
    left them uncompiled: the loop now runs outside the graph (models/common/attention.py). The check fails at the
    first recompile of a training step; the frames are all compiled in the first step."""
    frames = one_process["test_solo_runs:tiny_compile"].value()["frames_per_step"]
    assert frames[0] > 0 and frames[1:] == [0] * (len(frames) - 1), frames
