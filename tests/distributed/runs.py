"""Training runs as harness checks, and the loss comparison every run-level parity test uses."""
from pathlib import Path

from tests.conftest import TINY, tiny_overrides

RTOL = 1e-5  # fp32 run-level parity: relative difference of per-step losses
# A short greedy sample after training: equal weights under any layout give the same text.
SAMPLE = ("train.sample_prompt=The with statement", "train.sample_tokens=8")


def train_losses(run_dir: str, cache: str, overrides: list[str], config: str = "") -> list[float]:
    """Check body, run on every rank of a world: one training run, its per-step losses."""
    return train_summary(run_dir, cache, overrides, config)["losses"]


def train_summary(run_dir: str, cache: str, overrides: list[str], config: str = "") -> dict:
    """Check body: one training run of `config` (default: the tiny LLM); its per-step losses and final eval loss."""
    from launcher.config import load_config
    from launcher.trainer import train

    summary = train(load_config(Path(config) if config else TINY,
                                tiny_overrides(Path(run_dir), Path(cache), *overrides)))
    return {"losses": summary["losses"], "eval_loss": summary["eval_loss"], "sample": summary["sample"]}


def train_check(run_dir: Path, cache: Path, *overrides: str, summary: bool = False,
                config: Path | None = None) -> tuple[str, dict]:
    body = "train_summary" if summary else "train_losses"
    return (f"tests.distributed.runs:{body}", {"run_dir": str(run_dir), "cache": str(cache),
                                                "overrides": list(overrides), "config": str(config or "")})


def assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) and len(want) > 0
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert abs(g - w) <= RTOL * abs(w), f"step {step}: {g} vs {w} (relative {abs(g - w) / abs(w):.2e})"
