import pytest

from tests.distributed.harness import run_world
from tests.distributed.runs import train_check


@pytest.fixture(scope="session")
def reference_losses(tmp_path_factory, data_cache) -> list[float]:
    """The tiny test config's per-step losses on one process: what every layout must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    return run_world(1, [train_check(workdir / "run", data_cache)], workdir)[0].value()
