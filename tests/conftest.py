import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "llm" / "tiny.yaml"
TEST_VOCAB = 1024  # smaller than the tiny config's 4096: the tokenizer trains faster
VALID_FRACTION = 0.05  # the config's default, which the runs of tiny_overrides keep


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """The user's cache dir (the MFU peak's cache, launcher/metrics.py) in a temporary directory, for every
    run a test starts, in process or not."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """The embedded corpus prepared once per test session, before any world starts."""
    from data.embedded import prepare_embedded

    cache = tmp_path_factory.mktemp("data-cache")
    prepare_embedded("pydoc", TEST_VOCAB, cache, VALID_FRACTION, log=lambda _: None)
    return cache


def cached_tokenizer(cache: Path) -> Path:
    """The tokenizer tiny_overrides' runs use. The cache holds others (tests prepare their own corpora in it),
    so never pick "the" tokenizer.model by searching."""
    return cache / f"pydoc-v{TEST_VOCAB}-valid{VALID_FRACTION:g}" / "tokenizer.model"


def tiny_overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """A few-second version of configs/llm/tiny.yaml for tests."""
    return [f"run.dir={run_dir}", f"data.cache_dir={cache}", f"data.vocab_size={TEST_VOCAB}",
            "train.steps=10", "train.global_batch_size=8", "train.micro_batch_size=8", "train.seq_len=64",
            "train.warmup_steps=2", "train.eval_every=0", "train.eval_batches=1", "train.sample_prompt=",
            "run.tensorboard=false", "run.log_every=100", "checkpoint.every=0", *extra]


@pytest.fixture(scope="module")
def in_process_runs():
    """For a module whose tests run train() in the test process: give back its process group and stop-signal
    handlers afterwards (use with `pytestmark = pytest.mark.usefixtures("in_process_runs")`)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if dist.is_initialized():
        dist.destroy_process_group()
