import pytest

from tests.distributed.harness import run_world
from tests.distributed.runs import SAMPLE, train_check


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_cache) -> dict:
    """The tiny test config on one process (per-step losses, final eval loss, a greedy sample): what
    every layout must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    return run_world(1, [train_check(workdir / "run", data_cache, *SAMPLE, summary=True)], workdir)[0].value()


@pytest.fixture(scope="session")
def reference_losses(reference) -> list[float]:
    return reference["losses"]
