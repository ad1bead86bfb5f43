"""Measured peak live tensor bytes of real training steps: the trainer, unchanged, runs a short run under
LiveBytes. A harness check body (tests/distributed/harness.py) runs it on every rank of a gloo world."""
from pathlib import Path

from planner.live_bytes import LiveBytes

# A short run that only trains: two steps (the second has AdamW's states from the first), one eval batch at the
# end (smaller than a training step: no gradients), no checkpoint, sample or TensorBoard.
SHORT_RUN = ("train.steps=2", "train.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1",
             "train.sample_prompt=", "run.tensorboard=false", "run.log_every=100", "checkpoint.enabled=false",
             "run.lock=false")


def measured_peak(config: str, overrides: list[str], run_dir: str) -> int:
    """Peak bytes of live tensors on this rank over a short run of `config` (check body for every rank)."""
    from launcher.config import load_config
    from launcher.trainer import train

    cfg = load_config(Path(config), [*overrides, *SHORT_RUN, f"run.dir={run_dir}"])
    with LiveBytes() as live:
        train(cfg)
    return live.peak
