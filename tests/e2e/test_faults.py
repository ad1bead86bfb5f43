"""Fault injection into real (tiny, one-process, in this process) runs: random bytes in each kind of checkpoint
file, crafted pickles in `.metadata` and in a state entry, non-finite losses, a full disk during a save, a torn
metrics.jsonl. Each fault ends with one `error:` line naming what is wrong (exit 2) or is survived with the
losses of an uninterrupted run; no payload ever runs. The faults injected per kind are counted and printed at
the end of the module (the issue's closing note quotes them)."""
import collections
import copy
import errno
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

import launcher.checkpoint
import launcher.trainer
from launcher.checkpoint import RNGState, check_complete
from launcher.cli import USER_ERROR_EXIT, main
from launcher.config import load_config
from launcher.safe_dcp import load as safe_load
from launcher.trainer import TrainStep, train
from tests.conftest import TINY, tiny_overrides
from tests.e2e.full_disk_writer import FullDiskBackgroundWriter, FullDiskWriter
from tests.e2e.test_cli import losses_of, tree_digest

pytestmark = pytest.mark.usefixtures("in_process_runs")  # train() runs in this process

# Six steps, checkpoints at 2 and 4 (a base run stops at 4), so a resume has an earlier checkpoint to fall back to.
RUN = ("train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=3")
FAULTS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def report_fault_counts(request):
    yield
    line = "faults injected: " + ", ".join(f"{kind} {n}" for kind, n in sorted(FAULTS.items()))
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\n{line} (total {sum(FAULTS.values())})")


def sets(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [a for o in tiny_overrides(run_dir, cache, *RUN, *extra) for a in ("--set", o)]


def shardwright(capsys, *args: str) -> tuple[int, str]:
    """`shardwright ARGS` in this process: (exit code, stdout + stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def error_line(code: int, output: str, *fragments: str) -> str:
    assert code == USER_ERROR_EXIT, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_cache) -> Path:
    """An uninterrupted six-step run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(TINY, tiny_overrides(run_dir, data_cache, *RUN)))
    return run_dir


@pytest.fixture(scope="module")
def reference_losses(reference_run) -> dict[int, float]:
    return losses_of(reference_run)


def records_without_timing(run_dir: Path) -> list[dict]:
    timing = ("tokens_per_s", "tflops", "mfu", "mem_peak_gib")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_stopped_early_and_resumed_records_what_the_uninterrupted_run_does(tmp_path, data_cache, base_run,
                                                                                   reference_run):
    """run.stop_at_step=4 then a resume: the same metrics.jsonl records as the uninterrupted run (the early end's
    eval is said, not recorded, as the going run has none at step 4); an invocation with nothing left to train
    leaves the run's config.yaml as it was. After the loop a stop signal has its usual effect again (a SIGTERM during
    the final eval, save or sample was recorded and ignored)."""
    run_dir = copy_of(base_run, tmp_path)
    usual = signal.getsignal(signal.SIGTERM)
    train(load_config(TINY, tiny_overrides(run_dir, data_cache, *RUN)))
    assert signal.getsignal(signal.SIGTERM) is usual
    assert records_without_timing(run_dir) == records_without_timing(reference_run)
    recorded = (run_dir / "config.yaml").read_text()
    train(load_config(TINY, tiny_overrides(run_dir, data_cache, *RUN[1:], "train.steps=4")))  # nothing to train
    assert (run_dir / "config.yaml").read_text() == recorded


def test_a_resume_with_another_sequence_length_is_refused(tmp_path, data_cache, base_run, capsys):
    """The checkpoint's data position counts samples of its sequence length: a resume at another one would train on
    other samples (the embedded corpus' loader took it silently; a prepared dataset's refused it)."""
    run_dir = copy_of(base_run, tmp_path)
    before = tree_digest(run_dir)
    error_line(*shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache, "train.seq_len=32")),
               "was trained on sequences of", "train.seq_len=32")
    assert tree_digest(run_dir) == before


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_cache) -> Path:
    """The same run stopped after step 4: checkpoints step-2 and step-4 (each test damages a copy)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    train(load_config(TINY, tiny_overrides(run_dir, data_cache, *RUN, "run.stop_at_step=4")))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-2", "step-4"]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def overwrite_random_bytes(path: Path, rng: random.Random, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    start = rng.randrange(len(data) // 4, len(data) - count)
    data[start:start + count] = bytes(rng.randrange(256) for _ in range(count))
    path.write_bytes(bytes(data))


def file_of_kind(checkpoint: Path, kind: str) -> Path:
    return next(checkpoint.glob("*.distcp")) if kind == "shard" else checkpoint / kind


@pytest.mark.parametrize("kind", ["shard", ".metadata", "meta.json"])
def test_random_bytes_in_a_checkpoint_file_are_refused_naming_it(tmp_path, data_cache, base_run, capsys, kind):
    run_dir = copy_of(base_run, tmp_path)
    damaged = file_of_kind(run_dir / "checkpoints" / "step-4", kind)
    original = damaged.read_bytes()
    for seed in range(5):  # 16 random bytes at a random place, each time in the intact file
        damaged.write_bytes(original)
        overwrite_random_bytes(damaged, random.Random(f"{kind}-{seed}"))
        FAULTS[f"random bytes in {kind}"] += 1
        before = tree_digest(run_dir)
        line = error_line(*shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache)), damaged.name,
                          "step-4", "checkpoint.fallback=true")
        assert "damaged" in line
        assert tree_digest(run_dir) == before  # nothing written, nothing deleted


def test_fallback_resumes_from_the_newest_verified_checkpoint(tmp_path, data_cache, base_run, reference_losses,
                                                              capsys):
    run_dir = copy_of(base_run, tmp_path)
    overwrite_random_bytes(file_of_kind(run_dir / "checkpoints" / "step-4", "shard"), random.Random(0))
    FAULTS["random bytes in shard (fallback)"] += 1
    code, output = shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache, "checkpoint.fallback=true"))
    assert code == 0, output[-3000:]
    assert "failed verification" in output and f"resumed from {run_dir}/checkpoints/step-2 at step 2" in output
    assert losses_of(run_dir) == reference_losses  # bit-identical
    assert check_complete(run_dir / "checkpoints" / "step-4")["verified"]  # saved again, whole


def test_a_checkpoint_without_checksums_loads_unverified(tmp_path, data_cache, base_run, reference_losses, capsys):
    """As saved before checksums were recorded: resumed, and the log says it was not verified."""
    run_dir = copy_of(base_run, tmp_path)
    meta_file = run_dir / "checkpoints" / "step-4" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("files_sha256", "meta_sha256")}))
    code, output = shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache))
    assert code == 0, output[-3000:]
    assert "step-4 at step 4 unverified (it has no checksums" in output
    assert losses_of(run_dir) == reference_losses


def test_an_unreadable_checkpoint_file_is_refused_in_one_line(tmp_path, data_cache, base_run, capsys, monkeypatch):
    """A shard that cannot be read (EACCES here; EIO or a file gone since it was listed alike) is refused like a
    damaged one, in one line: a UserError, which check_complete_everywhere agrees across the ranks of a world (an
    OSError escaped it on the rank that read the file, while the others waited in its all_gather_object until the
    timeout). One process here."""
    run_dir = copy_of(base_run, tmp_path)
    before = tree_digest(run_dir)
    shard = file_of_kind(run_dir / "checkpoints" / "step-4", "shard")
    shard.chmod(0)
    if os.access(shard, os.R_OK):  # root reads it all the same: fail its read as the kernel would for anyone else
        real_sha256 = launcher.checkpoint.file_sha256

        def file_sha256(path: Path) -> str:
            if path.name == shard.name:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_sha256(path)

        monkeypatch.setattr(launcher.checkpoint, "file_sha256", file_sha256)
    FAULTS["unreadable shard"] += 1
    try:
        line = error_line(*shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache)), "step-4",
                          f"{shard.name} could not be read: PermissionError: Permission denied",
                          "checkpoint.fallback=true")
    finally:
        shard.chmod(0o644)
    assert "damaged" in line
    assert tree_digest(run_dir) == before


@pytest.mark.parametrize("fallback", ["false", "true"])
def test_latest_naming_a_missing_checkpoint(tmp_path, data_cache, base_run, reference_losses, capsys, fallback):
    """`latest` names step-4, which is gone: refused in one line naming it, or with checkpoint.fallback=true resumed
    from the newest verified earlier checkpoint, like a damaged one."""
    run_dir = copy_of(base_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    FAULTS["latest names a missing checkpoint"] += 1
    before = tree_digest(run_dir)
    code, output = shardwright(capsys, "train", str(TINY),
                               *sets(run_dir, data_cache, f"checkpoint.fallback={fallback}"))
    if fallback == "false":
        error_line(code, output, "points at 'step-4', which is not a checkpoint directory",
                   "checkpoint.fallback=true")
        assert tree_digest(run_dir) == before
        return
    assert code == 0, output[-3000:]
    assert "step-4 failed verification" in output and f"resumed from {run_dir}/checkpoints/step-2 at step 2" in output
    assert losses_of(run_dir) == reference_losses  # bit-identical


@pytest.mark.parametrize("checkpoints", ["true", "false"])
def test_a_stop_signal_exits_75_only_with_a_checkpoint_to_resume_from(tmp_path, data_cache, capsys, monkeypatch,
                                                                      checkpoints):
    """SIGUSR1 (Slurm's time-limit warning) during step 3: the run stops after it. With checkpoints, that step is
    saved and the run exits 75 (a Slurm job requeues itself and resumes). With checkpoint.enabled=false nothing is
    saved, so a requeue would start again from step 0, forever: one line and exit 2 instead."""
    run_dir = tmp_path / "run"
    real_step, calls = TrainStep.train_step, []

    def train_step(self, micro_batches):
        calls.append(len(calls) + 1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # recorded by the trainer's handler, acted on after the step
        return real_step(self, micro_batches)

    monkeypatch.setattr(TrainStep, "train_step", train_step)
    FAULTS["SIGUSR1 in process"] += 1
    args = ["train", str(TINY), *sets(run_dir, data_cache, f"checkpoint.enabled={checkpoints}")]
    if checkpoints == "true":
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            main(args)
        assert stopped.value.code == 75, capsys.readouterr().err[-3000:]
        assert "SIGUSR1 received: stopped after step 3; exit code 75" in capsys.readouterr().out
        assert (run_dir / "checkpoints" / "latest").read_text() == "step-3"
        return
    error_line(*shardwright(capsys, *args), "SIGUSR1 received: stopped after step 3 without a checkpoint",
               "checkpoint.enabled=true")
    assert not (run_dir / "checkpoints").exists() and max(losses_of(run_dir)) == 3


def test_a_stop_signal_to_every_process_of_an_async_run_still_publishes_its_saves(tmp_path, data_cache, capsys,
                                                                                  monkeypatch):
    """SIGTERM to the training process and to DCP's writer process alike (a terminal's Ctrl-C, Slurm's signal to a
    job step's processes) while an async save is in flight: the writer process ignores it and writes that save,
    the run stops after the step with every save published and exits 75."""
    run_dir = tmp_path / "run"
    real_step, calls = TrainStep.train_step, []

    def train_step(self, micro_batches):
        calls.append(len(calls) + 1)
        if len(calls) == 3:  # step 2's save is in flight (checkpoint.every=1)
            for process in [os.getpid(), *(child.pid for child in multiprocessing.active_children())]:
                os.kill(process, signal.SIGTERM)
        return real_step(self, micro_batches)

    monkeypatch.setattr(TrainStep, "train_step", train_step)
    FAULTS["SIGTERM to the training and writer processes"] += 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(["train", str(TINY), *sets(run_dir, data_cache, "checkpoint.async_save=true", "checkpoint.every=1",
                                        "checkpoint.keep_last=5")])
    assert stopped.value.code == 75, capsys.readouterr().err[-3000:]
    assert "SIGTERM received: stopped after step 3; exit code 75" in capsys.readouterr().out
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-3"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-1", "step-2", "step-3"]
    for step in (1, 2, 3):
        assert check_complete(checkpoints / f"step-{step}")["verified"]
    assert all(child.is_alive() for child in multiprocessing.active_children())


@pytest.mark.parametrize("checkpoints", ["true", "false"])
def test_a_stop_signal_before_the_first_step_is_one_line(tmp_path, data_cache, base_run, capsys, monkeypatch, request,
                                                         checkpoints):
    """SIGTERM while the run starts (here: while its model is initialized, resuming from step 4): it ends the run at
    once, as SIGTERM's usual action would, but with one line saying so instead of none. With checkpoints exit 75
    (nothing new was saved; running again starts where the run was), the run directory byte-identical; without,
    one `error:` line and exit 2 (a requeue would start again from step 0), nothing trained."""
    def usual_action(_signum, _frame):  # stands for SIGTERM's usual action, which would end pytest
        raise AssertionError("SIGTERM had its usual effect: the process would have ended without a word")

    previous = signal.signal(signal.SIGTERM, usual_action)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))
    real_materialize = launcher.trainer.materialize

    def materialize(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_materialize(*args, **kwargs)

    monkeypatch.setattr(launcher.trainer, "materialize", materialize)
    FAULTS["SIGTERM in process before the first step"] += 1
    run_dir = copy_of(base_run, tmp_path) if checkpoints == "true" else tmp_path / "run"
    before = tree_digest(run_dir) if checkpoints == "true" else None
    code, output = shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache,
                                                                 f"checkpoint.enabled={checkpoints}"))
    if checkpoints == "true":
        assert code == 75, output[-3000:]
        assert "error:" not in output and "Traceback" not in output, output[-3000:]
        said = [line for line in output.splitlines() if "before the first step" in line]
        assert said == ["[shardwright] SIGTERM received before the first step: stopped with nothing trained or saved, "
                        "the last checkpoint is step-4 (checkpoints/latest); exit code 75: run the same command to "
                        "start again"], output[-3000:]
        assert tree_digest(run_dir) == before
    else:
        error_line(code, output, "SIGTERM received before the first step: stopped with nothing trained or saved "
                                 "(checkpoint.enabled=false); run the same command to start again")
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    assert signal.getsignal(signal.SIGTERM) is usual_action  # the command put back what it found


class _CreatesMarker:
    """Unpickling this creates the file `path`: a stand-in for any code a crafted pickle would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def payload(marker: Path) -> bytes:
    return pickle.dumps(_CreatesMarker(marker))


def test_the_payload_works(tmp_path):
    """The control: unpickling the crafted bytes does create the marker."""
    pickle.loads(payload(tmp_path / "marker")).close()
    assert (tmp_path / "marker").exists()


def record_checksums(checkpoint: Path) -> None:
    """What a tamperer can do: rewrite meta.json's checksums to match the crafted files (they guard against
    damage, not attacks; the restricted reading does)."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files_sha256"] = {name: hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
                            for name in meta["files_sha256"]}
    fields = {k: v for k, v in meta.items() if k != "meta_sha256"}
    meta["meta_sha256"] = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_a_crafted_metadata_pickle_never_runs(tmp_path, data_cache, base_run, capsys):
    run_dir = copy_of(base_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-4"
    marker = tmp_path / "marker"
    (checkpoint / ".metadata").write_bytes(payload(marker))
    record_checksums(checkpoint)
    entry_points = {
        "train": ["train", str(TINY), *sets(run_dir, data_cache)],
        "submit --dry-run": ["submit", str(TINY), "--nodes", "1", "--gpus-per-node", "1", "--device", "cpu",
                             "--dry-run", *sets(run_dir, data_cache)],
        "convert to-file": ["convert", "to-file", str(run_dir), str(tmp_path / "out.safetensors")],
        "checkpoint.init_from": ["train", str(TINY), *sets(tmp_path / "new", data_cache,
                                                            f"checkpoint.init_from={checkpoint}")],
    }
    for name, args in entry_points.items():
        FAULTS[f"crafted .metadata pickle ({name})"] += 1
        error_line(*shardwright(capsys, *args), str(checkpoint / ".metadata"), "not DCP metadata")
        assert not marker.exists(), name


def test_a_crafted_state_entry_never_runs(tmp_path, data_cache, base_run, capsys):
    """A non-tensor entry (the loader's step) replaced by a pickle with a payload, the checkpoint otherwise whole and
    its checksums rewritten: refused when read, naming the entry."""
    run_dir = copy_of(base_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-4"
    state: dict = {}
    # torch's own reader reads our own good checkpoint whole (dcp.load would want the entries named beforehand).
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(checkpoint), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    marker = tmp_path / "marker"
    state["data"]["step"] = _CreatesMarker(marker)
    crafted = tmp_path / "crafted"
    dcp.save(state, checkpoint_id=crafted, no_dist=True)
    for file in crafted.iterdir():
        shutil.copy(file, checkpoint / file.name)
    record_checksums(checkpoint)
    FAULTS["crafted state entry pickle"] += 1
    error_line(*shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache)), "entry data.step",
               "tampered")
    assert not marker.exists()


def inject_nonfinite(monkeypatch, steps: set[int]) -> None:
    """NaN loss and gradients on the given steps of a fresh run (counted by backward passes)."""
    real = TrainStep.forward_backward
    done = [0]

    def forward_backward(self, micro_batches, backward=True):
        record = real(self, micro_batches, backward)
        if backward:
            done[0] += 1
            if done[0] in steps:
                for part in self.parts:
                    for p in part.parameters():
                        p.grad.fill_(float("nan"))
                record["loss"] = float("nan")
        return record

    monkeypatch.setattr(TrainStep, "forward_backward", forward_backward)
    FAULTS["non-finite step"] += len(steps)


def model_is_finite(checkpoint: Path) -> bool:
    saved = check_complete(checkpoint)
    state = {key: torch.empty(size, dtype=saved["dtypes"][key]) for key, size in saved["sizes"].items()
             if key.startswith("model.")}
    safe_load(state, checkpoint, no_dist=True)
    return all(bool(t.isfinite().all()) for t in state.values())


def test_a_nonfinite_step_stops_the_run_by_default(tmp_path, data_cache, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    inject_nonfinite(monkeypatch, {3})
    error_line(*shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache)), "step 3", "not finite",
               "step-2 (checkpoints/latest)", "train.nonfinite=skip")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-2"]
    assert model_is_finite(run_dir / "checkpoints" / "step-2")


def test_skip_drops_nonfinite_steps_then_stops_after_too_many(tmp_path, data_cache, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    inject_nonfinite(monkeypatch, {2, 3})  # 2 in a row: below max_nonfinite_steps=3
    code, output = shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache, "train.steps=4",
                                                                 "train.nonfinite=skip"))
    assert code == 0, output[-3000:]
    assert "step 2: loss nan / grad norm nan not finite: optimizer step skipped (1 of at most 2" in output
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "loss" in r}
    assert [s for s, r in records.items() if r.get("skipped_nonfinite")] == [2, 3]
    for step in (2, 4):  # step-2 holds the weights of step 1
        assert model_is_finite(run_dir / "checkpoints" / f"step-{step}")

    run_dir = tmp_path / "run-too-many"
    monkeypatch.undo()  # a fresh count of steps
    inject_nonfinite(monkeypatch, {2, 3, 4})
    error_line(*shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache, "train.steps=4",
                                                              "train.nonfinite=skip")),
               "step 4", "3 step(s) in a row", "step-2 (checkpoints/latest)")
    assert model_is_finite(run_dir / "checkpoints" / "step-2")


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_a_full_disk_during_a_save_is_one_line_and_resumes(tmp_path, data_cache, base_run, reference_losses,
                                                            capsys, monkeypatch, async_save):
    """The final save (step 6) hits a file size limit (tests/e2e/full_disk_writer.py: EFBIG, as a full disk gives
    ENOSPC, through the real DCP writer, in DCP's writer process with async_save); the rerun resumes from step 4."""
    run_dir = copy_of(base_run, tmp_path)
    # both writers: the synchronous save's (this process) and the async one's (DCP's writer process)
    monkeypatch.setattr(launcher.checkpoint, "_ErrnoKeepingWriter", FullDiskWriter)
    monkeypatch.setattr(launcher.checkpoint, "_BackgroundWriter", FullDiskBackgroundWriter)
    FAULTS["full disk during a save"] += 1
    settings = sets(run_dir, data_cache, f"checkpoint.async_save={async_save}")
    error_line(*shardwright(capsys, "train", str(TINY), *settings), "while saving step 6",
               "EFBIG", "the last complete checkpoint is step-4")
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2", "step-4"]  # staging removed
    monkeypatch.undo()
    code, output = shardwright(capsys, "train", str(TINY), *settings)
    assert code == 0, output[-3000:]
    assert f"resumed from {checkpoints / 'step-4'} at step 4" in output  # not a fresh run, which has the same losses
    assert losses_of(run_dir) == reference_losses


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, data_cache, base_run, reference_losses, capsys):
    run_dir = copy_of(base_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "loss": 6.1')  # the process died while writing step 5's record
    FAULTS["torn metrics.jsonl"] += 1
    code, output = shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache))
    assert code == 0, output[-3000:]
    assert "metrics.jsonl: dropped its last line, cut short" in output
    assert f"resumed from {run_dir / 'checkpoints' / 'step-4'} at step 4" in output
    assert losses_of(run_dir) == reference_losses


def test_a_damaged_metrics_line_is_refused(tmp_path, data_cache, base_run, capsys):
    run_dir = copy_of(base_run, tmp_path)
    lines = (run_dir / "metrics.jsonl").read_bytes().split(b"\n")
    (run_dir / "metrics.jsonl").write_bytes(b"\n".join([lines[0], b"\x00garbage\xff", *lines[1:]]))
    FAULTS["damaged metrics.jsonl line"] += 1
    before = tree_digest(run_dir)
    error_line(*shardwright(capsys, "train", str(TINY), *sets(run_dir, data_cache)), "metrics.jsonl line 2")
    assert tree_digest(run_dir) == before


def test_rng_state_round_trips_as_tensors():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # both keep a cached second gaussian

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(),
                torch.rand(3).tolist())

    state = RNGState(0, with_cuda=False)
    saved = copy.deepcopy(state.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in saved["rank0"].values())
    expected = draws()
    state.load_state_dict(saved)
    assert draws() == expected


def test_async_saves_publish_verified_checkpoints_that_resume_exactly(tmp_path, data_cache, reference_losses):
    """checkpoint.async_save=true: every checkpoint is published (verified, `latest` moved), and step-2, written
    in the background while step 3 updated the weights, holds step 2's state: resuming it gives the losses of an
    uninterrupted run."""
    run_dir = tmp_path / "run"
    train(load_config(TINY, tiny_overrides(run_dir, data_cache, *RUN, "checkpoint.async_save=true")))
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2", "step-4", "step-6"]
    assert (checkpoints / "latest").read_text() == "step-6"
    assert all(check_complete(checkpoints / f"step-{n}")["verified"] for n in (2, 4, 6))
    assert losses_of(run_dir) == pytest.approx(reference_losses, rel=1e-6)
    shutil.rmtree(checkpoints / "step-4")
    shutil.rmtree(checkpoints / "step-6")
    (checkpoints / "latest").write_text("step-2")
    resumed = train(load_config(TINY, tiny_overrides(run_dir, data_cache, *RUN, "checkpoint.async_save=true")))
    assert len(resumed["losses"]) == len(reference_losses) - 2  # steps 3.. only: resumed, not started afresh
    assert losses_of(run_dir) == pytest.approx(reference_losses, rel=1e-6)


def test_an_async_save_writes_the_state_of_when_it_was_called(tmp_path):
    """The training step after an async save updates the weights in place while the background thread writes:
    the checkpoint still holds the values at the save (async_save copies CPU tensors too)."""
    if not dist.is_initialized():  # else the one-rank group of an earlier train() here, given back at module end
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    weights = torch.arange(1 << 20, dtype=torch.float32)
    checkpointer = launcher.checkpoint.Checkpointer(tmp_path, keep_last=1, rank=0, async_save=True)
    assert checkpointer.save(1, {"w": weights}, {}) is None  # pending
    weights.add_(1.0)
    assert checkpointer.wait() == tmp_path / "checkpoints" / "step-1"
    assert check_complete(tmp_path / "checkpoints" / "step-1")["verified"]
    loaded = {"w": torch.zeros_like(weights)}
    safe_load(loaded, tmp_path / "checkpoints" / "step-1")
    assert torch.equal(loaded["w"], torch.arange(1 << 20, dtype=torch.float32))


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only")
def test_an_async_save_writes_and_hashes_at_the_lowest_priority_leaving_training_s_own(tmp_path, monkeypatch):
    """An async save is written by DCP's writer process, whose writing thread runs at nice 19, and hashed by a
    thread at nice 19, so that training keeps the cores it has busy; the thread that called save (training's)
    keeps its priority."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    hashed_at = []

    def priority(thread_id=None):
        return os.getpriority(os.PRIO_PROCESS, thread_id or threading.get_native_id())

    def recording(path):
        hashed_at.append(priority())
        return real_hash(path)

    real_hash = launcher.checkpoint.file_sha256
    monkeypatch.setattr(launcher.checkpoint, "file_sha256", recording)
    training = priority()
    if training == 19:
        pytest.skip("the tests run at nice 19 already: a lowered thread would not differ from training's")
    checkpointer = launcher.checkpoint.Checkpointer(tmp_path, keep_last=1, rank=0, async_save=True)
    checkpointer.save(1, {"w": torch.ones(8)}, {})
    assert checkpointer.wait() == tmp_path / "checkpoints" / "step-1"
    assert priority() == training
    assert hashed_at and set(hashed_at) == {19}
    # DCP's writer process: one per training process, started by the first Checkpointer that saves asynchronously
    (writer,) = multiprocessing.active_children()
    assert priority(writer.pid) == 19  # its main thread, which writes
