"""`shardwright plan`'s memory model against real 2-rank training steps: tensor, pipeline and expert parallel
layouts measured in one gloo world (benchmarks/plan_memory.py measures more)."""
from pathlib import Path

import pytest

from launcher.config import load_config
from planner.predict import predict_memory
from tests.conftest import TEST_VOCAB, TINY
from tests.distributed.harness import run_world

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 0.15
LAYOUTS = {
    "tp2": (TINY, ["parallel.tp=2", "parallel.dp_shard=1"]),
    "pp2-1f1b": (TINY, ["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=4"]),
    "moe-ep2": (REPO / "configs" / "moe" / "tiny.yaml", ["parallel.ep=2"]),
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory, data_cache) -> dict[str, tuple[list[int], list[str]]]:
    workdir = tmp_path_factory.mktemp("plan-memory")
    # The tiny configs' batch (16 rows of 128 tokens) with the tests' vocabulary.
    overrides = {name: [f"data.cache_dir={data_cache}", f"data.vocab_size={TEST_VOCAB}", *extra]
                 for name, (_, extra) in LAYOUTS.items()}
    checks = [("planner.measure:measured_peak", {"config": str(LAYOUTS[name][0]), "overrides": overrides[name],
                                                  "run_dir": str(workdir / name)}) for name in LAYOUTS]
    results = run_world(2, checks, workdir)
    return {name: ([result.value(rank) for rank in range(2)], overrides[name])
            for name, result in zip(LAYOUTS, results)}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_peak_of_the_most_loaded_rank_is_within_tolerance(measured, name):
    per_rank, overrides = measured[name]
    predicted = predict_memory(load_config(LAYOUTS[name][0], overrides), 2).total
    assert abs(predicted / max(per_rank) - 1) <= TOLERANCE, (predicted, per_rank)
