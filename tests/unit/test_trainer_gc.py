"""The training loop runs with the objects made at set-up frozen out of Python's garbage collections
(launcher/trainer.py: set_up_objects_frozen), and unfrozen however the loop ends, so that what a run leaves in
reference cycles can be collected after it. Tiny runs, one process (train() runs in the test process)."""
import gc

import pytest

from launcher.config import load_config
from launcher.trainer import TrainStep, train
from tests.conftest import TINY, tiny_overrides

pytestmark = pytest.mark.usefixtures("in_process_runs")  # train() runs in this process

SMALL = ("model.dim=32", "model.n_layers=1", "model.n_heads=2", "train.steps=2", "checkpoint.enabled=false")
TRAIN_STEP = TrainStep.train_step


def test_set_up_objects_are_frozen_for_the_loop_and_unfrozen_however_it_ends(tmp_path, data_cache, monkeypatch):
    assert gc.get_freeze_count() == 0
    frozen_at_steps = []

    def recording(self, micro_batches):
        frozen_at_steps.append(gc.get_freeze_count())
        return TRAIN_STEP(self, micro_batches)

    monkeypatch.setattr(TrainStep, "train_step", recording)
    train(load_config(TINY, tiny_overrides(tmp_path / "run", data_cache, *SMALL)))
    assert len(frozen_at_steps) == 2 and min(frozen_at_steps) > 0, frozen_at_steps
    assert gc.get_freeze_count() == 0

    def failing(self, micro_batches):
        raise RuntimeError("a step failed")

    monkeypatch.setattr(TrainStep, "train_step", failing)
    with pytest.raises(RuntimeError, match="a step failed"):
        train(load_config(TINY, tiny_overrides(tmp_path / "failed", data_cache, *SMALL)))
    assert gc.get_freeze_count() == 0
