import importlib

import pytest

from tests.distributed.harness import CheckResult, run_world
from tests.distributed.runs import SAMPLE, train_check

# Test modules whose one-process references depend on no other run: each defines
# one_process_checks(workdir, cache) -> {name: check}.
MODULES_WITH_REFERENCES = ("test_training", "test_tensor_parallel", "test_expert_parallel", "test_deltanet",
                           "test_tokenformer", "test_family_contract", "test_context_training",
                           "test_matformer_runs", "test_matformer_tp", "test_solo_runs")


@pytest.fixture(scope="session")
def one_process(tmp_path_factory, data_cache) -> dict[str, CheckResult]:
    """Every independent one-process reference of the distributed tests, run in one world: a world's
    first run pays seconds of start-up (imports, lazy initialization) that its later runs do not.
    Keys: "reference" (the tiny LLM) and "<module>:<name>"; a failed run fails only the tests that read it."""
    workdir = tmp_path_factory.mktemp("one-process")
    checks = {"reference": train_check(workdir / "reference", data_cache, *SAMPLE, summary=True)}
    for name in MODULES_WITH_REFERENCES:
        module = importlib.import_module(f"tests.distributed.{name}")
        for key, check in module.one_process_checks(workdir / name, data_cache).items():
            checks[f"{name}:{key}"] = check
    return dict(zip(checks, run_world(1, list(checks.values()), workdir, timeout_s=900)))


@pytest.fixture(scope="session")
def reference(one_process) -> dict:
    """The tiny test config on one process (per-step losses, final eval loss, a greedy sample): what
    every layout must reproduce."""
    return one_process["reference"].value()


@pytest.fixture(scope="session")
def reference_losses(reference) -> list[float]:
    return reference["losses"]
