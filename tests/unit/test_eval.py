"""The run's eval (launcher/trainer.py: eval_batches, TrainStep.evaluate) reads at most the whole valid split, no
sample twice, in whole global batches (every dp rank its equal share), the same ones at every eval, and says once in
the log when that is fewer than train.eval_batches; a valid split that cannot fill one global batch is refused in
one line. Tiny runs, one process (train() runs in the test process)."""

import pytest

from launcher.cli import USER_ERROR_EXIT, main
from launcher.config import load_config
from launcher.trainer import TrainStep, train
from tests.conftest import TINY, tiny_overrides

pytestmark = pytest.mark.usefixtures("in_process_runs")  # train() runs in this process

# Sequences of 256 tokens: the test corpus' valid split holds a few global batches of 8 of them.
SMALL = ("model.dim=32", "model.n_layers=1", "model.n_heads=2", "train.steps=2", "train.seq_len=256")
FEWER = "not train.eval_batches="
EVALUATE = TrainStep.evaluate


def evaluated_samples(monkeypatch, cfg) -> tuple[list[list[int]], int]:
    """(the valid samples each eval of a run of `cfg` read, in order; the valid split's size), seen by the loader
    the eval loop is given."""
    evals, size = [], []

    class Recording:
        def __init__(self, loader):
            self.loader = loader

        def micro_batches(self, step):
            evals[-1].extend(i for _, i in self.loader.rank_samples(step))
            return self.loader.micro_batches(step)

    def recorded(self, loader, n_batches):
        evals.append([])
        size.append(loader.samples.num_samples)
        return EVALUATE(self, Recording(loader), n_batches)

    monkeypatch.setattr(TrainStep, "evaluate", recorded)
    train(cfg)
    return evals, size[0]


def test_eval_reads_whole_batches_of_distinct_samples_when_asked_for_more(tmp_path, data_cache, monkeypatch, capsys):
    cfg = load_config(TINY, tiny_overrides(tmp_path / "run", data_cache, *SMALL, "train.eval_every=1",
                                           "train.eval_batches=1000"))
    batch = cfg.train.global_batch_size
    evals, size = evaluated_samples(monkeypatch, cfg)
    assert len(evals) == 2 and evals[0] == evals[1]  # at step 1 and at the end: the same samples
    seen = evals[0]
    assert len(set(seen)) == len(seen)  # no sample twice
    assert len(seen) % batch == 0 and len(seen) <= size < len(seen) + batch  # every whole batch the split holds
    assert len(seen) < 1000 * batch
    notes = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if FEWER in line]
    assert len(notes) == 1 and f"eval reads {len(seen) // batch} global batch(es) of {batch} samples" in notes[0]
    assert f"the valid split serves {size} samples" in notes[0] and notes[0] in capsys.readouterr().out

    # The control: eval_batches the split holds are read as asked, without the note.
    cfg = load_config(TINY, tiny_overrides(tmp_path / "fits", data_cache, *SMALL, "train.eval_batches=2"))
    evals, _ = evaluated_samples(monkeypatch, cfg)
    assert len(evals) == 1 and len(evals[0]) == 2 * batch
    assert FEWER not in (tmp_path / "fits" / "train.log").read_text()


def test_a_valid_split_smaller_than_a_global_batch_is_refused(tmp_path, data_cache, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", str(TINY)]
    for override in tiny_overrides(run_dir, data_cache, *SMALL, "train.seq_len=2048"):
        argv += ["--set", override]
    assert main(argv) == USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the valid split serves ") and "\n" not in err
    assert "fewer than one global batch (train.global_batch_size=8)" in err and "data.valid_fraction" in err
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
