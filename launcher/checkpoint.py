"""DCP checkpoints published atomically under <run.dir>/checkpoints/.

    checkpoints/step-<N>/      a complete DCP checkpoint (.metadata, shard files) + meta.json
    checkpoints/latest         text "step-<N>", replaced atomically once step-<N> is complete

Every rank writes into checkpoints/.staging-step-<N>/; only after all ranks are done does rank 0
rename it to step-<N> and then repoint `latest`. A crash at any moment leaves `latest` at the
previous complete checkpoint; staging leftovers are never read and are cleared on the next save.
With async_save the staging directory is written by DCP's writer process from a copy in shared memory, and
the same publish happens on the main thread once every rank's write is done (Checkpointer.poll, wait).

meta.json, written last, records the SHA-256 of every other file of the checkpoint (and its own
fields'), so a checkpoint is verified before it is loaded: damaged bytes anywhere are refused with
one line naming the file. Nothing in a checkpoint is unpickled beyond DCP's own metadata classes
and plain values (launcher/safe_dcp.py): RNG states are tensors.
"""
import errno
import gc
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.util
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from launcher.config import Config
from launcher.deepspeed_engine import SUBDIR
from launcher.distributed import all_reduce_number
from launcher.errors import UserError
from launcher.optim import Optimizers
from launcher.safe_dcp import load as safe_load
from launcher.safe_dcp import METADATA_FILE, read_metadata
from models.spec import architecture
from parallel.init import canonical_name, stored_orders, to_canonical, to_stored
from parallel.mesh import ParallelDims

META_FILE = "meta.json"
# meta.json fields: the SHA-256 of each file of the checkpoint, and of meta.json's other fields (canonical JSON).
FILES_SHA256 = "files_sha256"
META_SHA256 = "meta_sha256"
_HASH_CHUNK = 4 << 20


def _canonical_order(state: dict, parts: list[nn.Module], param_of) -> dict:
    """`state` with each tensor of a parameter stored permuted (`param_of(key)`: the parameter a key holds state
    of, or None; parallel/init.py: stored_orders) replaced by its full tensor in canonical order, replicated on
    its mesh (DCP writes it once): what a checkpoint holds whatever the layout that saved it."""
    orders = stored_orders(parts)
    out = dict(state)
    for key, value in state.items():
        if (order := orders.get(param_of(key))) is not None and isinstance(value, DTensor):
            mesh = value.device_mesh
            out[key] = distribute_tensor(to_canonical(value.full_tensor(), order), mesh, [Replicate()] * mesh.ndim,
                                         src_data_rank=None)
    return out


def _stored_order(state: dict, parts: list[nn.Module], param_of) -> dict:
    """The inverse of _canonical_order on a loaded state: each canonical full tensor permuted back and sharded
    like its parameter (every rank holds the full tensor: no communication)."""
    orders = stored_orders(parts)
    params = {canonical_name(name): p for part in parts for name, p in part.named_parameters()}
    out = dict(state)
    for key, value in state.items():
        if (order := orders.get(name := param_of(key))) is not None and isinstance(value, DTensor):
            param = params[name]
            out[key] = distribute_tensor(to_stored(value.to_local(), order), param.device_mesh, param.placements,
                                         src_data_rank=None)
    return out


def _optimizer_key(key: str) -> str | None:
    """The parameter a flattened optimizer state key holds state of ("state.<fqn>.exp_avg"); None for
    param_groups entries."""
    return key[len("state."):].rpartition(".")[0] if key.startswith("state.") else None


class ModelState(Stateful):
    """The parameters of this rank's model parts (one, or one per pipeline stage), keyed by
    canonical names (no FSDP/AC/compile wrappers, no stage prefix) and in canonical order, resharded on load."""

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts

    def state_dict(self):
        return _canonical_order({k: v for part in self.parts for k, v in get_model_state_dict(part).items()},
                                self.parts, lambda key: key)

    def load_state_dict(self, state_dict):
        state_dict = _stored_order(state_dict, self.parts, lambda key: key)
        for part in self.parts:
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=False))


class OptimizerState(Stateful):
    """One optimizer per model part, saved flattened by parameter name (state in canonical order, as
    ModelState's) so any stage split (or none) and any layout can load it.

    torch's flattened form repeats every param-group option (lr, betas, eps, ...) once per parameter; DCP
    writes each such value as a pickle of its own, and they were three quarters of a checkpoint's entries
    and most of a save's time (docs/checkpoints.md). Saved here instead: `param_group_options.<group
    name>.<option>`, once per named group (launcher/optim.py), identical on every rank; loading gives each
    parameter the options of its group's name. Checkpoints with the per-parameter entries still load
    (`per_parameter_options`, set by Checkpointer.load from the checkpoint's keys)."""

    _OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.parts = parts
        self.pairs = list(zip(parts, optimizers))
        self.per_parameter_options = False

    def _flattened(self) -> dict:
        return {k: v for part, opt in self.pairs
                for k, v in get_optimizer_state_dict(part, opt, options=self._OPTIONS).items()}

    def state_dict(self):
        flat = self._flattened()
        if self.per_parameter_options:  # the template of a checkpoint saved before groups had names
            state = {k: v for k, v in flat.items() if not (k.startswith(_GROUP_PREFIX) and k.endswith(".name"))}
            return _canonical_order(state, self.parts, _optimizer_key)
        state = {k: v for k, v in flat.items() if not k.startswith(_GROUP_PREFIX)}
        for fqn, options in _options_by_parameter(flat).items():
            for option, value in options.items():
                if state.setdefault(key := f"{_OPTIONS_PREFIX}{options['name']}.{option}", value) != value:
                    raise RuntimeError(f"param group {options['name']!r} has {option}={value} for {fqn} but "
                                       f"{state[key]} for another parameter")
        return _canonical_order(state, self.parts, _optimizer_key)

    def load_state_dict(self, state_dict):
        state_dict = _stored_order(state_dict, self.parts, _optimizer_key)
        flat = {k: v for k, v in state_dict.items() if not k.startswith((_GROUP_PREFIX, _OPTIONS_PREFIX))}
        by_name: dict[str, dict] = {}
        for key, value in state_dict.items():
            if key.startswith(_OPTIONS_PREFIX):
                name, _, option = key[len(_OPTIONS_PREFIX):].partition(".")
                by_name.setdefault(name, {})[option] = value
        by_parameter = _options_by_parameter(state_dict)
        for fqn, current in _options_by_parameter(self._flattened()).items():
            saved = by_parameter.get(fqn) if self.per_parameter_options else by_name.get(current["name"])
            if saved is None:
                held = "per parameter" if self.per_parameter_options else f"for the groups {sorted(by_name)}"
                raise RuntimeError(f"the optimizer state holds no param-group options for {fqn} (group "
                                   f"{current['name']!r}); it holds them {held}")
            for option, value in current.items():  # an option the saved state lacks (its name) keeps its value
                flat[f"{_GROUP_PREFIX}{fqn}.{option}"] = value if option in CONFIG_OPTIONS else saved.get(option, value)
        for part, opt in self.pairs:
            set_optimizer_state_dict(part, opt, flat, options=self._OPTIONS)


# Param-group options the run's config sets (train.weight_decay, beta1, beta2): a resume applies the config's values,
# as its config.yaml records them. The learning rate is the schedule's (launcher/optim.py: _ScheduleState).
CONFIG_OPTIONS = ("weight_decay", "betas")
_GROUP_PREFIX = "param_groups."  # torch's flattened form: param_groups.<parameter>.<option>
_OPTIONS_PREFIX = "param_group_options."  # ours: param_group_options.<group name>.<option>


def _options_by_parameter(flat: dict) -> dict[str, dict]:
    """{parameter: {option: value}} from the `param_groups.<parameter>.<option>` entries of a flattened state."""
    options: dict[str, dict] = {}
    for key, value in flat.items():
        if key.startswith(_GROUP_PREFIX):
            fqn, _, option = key[len(_GROUP_PREFIX):].rpartition(".")
            options.setdefault(fqn, {})[option] = value
    return options


class RNGState(Stateful):
    """This rank's generators as tensors (never pickled), stored under its own rank so every rank gets its own
    stream back. Python's Mersenne Twister state is 625 ints below 2**32 and an optional cached gaussian;
    numpy's legacy state 624 uint32 keys, a position and a cached gaussian; torch's a byte tensor per device.
    `with_cuda`: save (and expect on load) the CUDA generators too."""

    def __init__(self, rank: int, with_cuda: bool):
        self.key = f"rank{rank}"
        self.with_cuda = with_cuda

    def state_dict(self):
        _version, python_words, python_gauss = random.getstate()
        _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state(legacy=True)
        states = {"python_words": torch.tensor(python_words, dtype=torch.int64),
                  "python_gauss": torch.tensor([python_gauss is not None, python_gauss or 0.0], dtype=torch.float64),
                  "numpy_keys": torch.from_numpy(numpy_keys.astype(np.int64)),
                  "numpy_pos": torch.tensor([numpy_pos, numpy_has_gauss], dtype=torch.int64),
                  "numpy_gauss": torch.tensor(numpy_gauss, dtype=torch.float64),
                  "torch": torch.get_rng_state()}
        if self.with_cuda:
            states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        return {self.key: states}

    def load_state_dict(self, state_dict):
        states = state_dict[self.key]
        has_gauss, gauss = states["python_gauss"].tolist()
        random.setstate((random.getstate()[0], tuple(states["python_words"].tolist()), gauss if has_gauss else None))
        pos, numpy_has_gauss = states["numpy_pos"].tolist()
        np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), pos, numpy_has_gauss,
                             states["numpy_gauss"].item()))
        torch.set_rng_state(states["torch"])
        if self.with_cuda:
            torch.cuda.set_rng_state_all(list(states["cuda"]))


def training_state(parts: list[nn.Module], optimizers: Optimizers, loader: Stateful) -> dict[str, Stateful]:
    """What a checkpoint holds besides each rank's RNG: train saves and resumes it, conversions rewrite it."""
    return {"model": ModelState(parts), "optimizer": OptimizerState(parts, optimizers.optimizers),
            "scheduler": optimizers.schedule_state, "data": loader}


def checkpoint_meta(cfg: Config, tokenizer: str, dims: ParallelDims) -> dict:
    """meta.json of a run's checkpoints (besides the step): what a resume checks (family, architecture,
    tokenizer) and where the checkpoint came from."""
    return {"family": cfg.model.family, "model": architecture(cfg.model_config()), "tokenizer": tokenizer,
            "data": asdict(cfg.data), "seq_len": cfg.train.seq_len, "layout": asdict(dims), "engine": engine_name(cfg)}


def engine_name(cfg: Config) -> str:
    """What wrote a checkpoint's model and optimizer state: "torch" (DCP) or "deepspeed-zero<stage>" (its own)."""
    p = cfg.parallel
    return "torch" if p.engine == "torch" else f"{p.engine}-zero{p.zero_stage}"


def check_same_engine(saved: dict, cfg: Config, dims: ParallelDims, path: Path) -> None:
    """Refuse to resume a checkpoint another engine (or ZeRO stage) wrote, and a DeepSpeed one on another layout
    (its files are per rank; DCP's reshard). Checkpoints from before engines were recorded are torch's."""
    saved_engine, engine = saved.get("engine", "torch"), engine_name(cfg)
    if saved_engine != engine:
        raise UserError(f"{path} was saved by engine {saved_engine}, this run is {engine}; resume with the settings "
                        f"that saved it, or start a new run.dir from its weights with checkpoint.init_from="
                        f"{path / SUBDIR if saved_engine != 'torch' else path}")
    if engine != "torch" and saved.get("layout") != asdict(dims):
        raise UserError(f"{path} holds DeepSpeed's per-rank files of {saved.get('layout', {}).get('world_size')} "
                        f"ranks; resume it on the same number of processes, or start a new run.dir from its weights "
                        f"with checkpoint.init_from={path / SUBDIR}")


def check_same_sequence_length(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse to resume a checkpoint trained on sequences of another length: the data position it holds counts
    samples of its length, so the resumed run would not see the samples the run would have (checkpoints from before
    the length was recorded are not checked here; a prepared dataset's loader checks it itself)."""
    if saved.get("seq_len", cfg.train.seq_len) != cfg.train.seq_len:
        raise UserError(f"{path} was trained on sequences of {saved['seq_len']} tokens, this run has train.seq_len="
                        f"{cfg.train.seq_len}, so the resumed run would not see the same samples: set train.seq_len="
                        f"{saved['seq_len']}, or start a new run.dir from its weights with checkpoint.init_from={path}")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync of a file (its data) or a directory (its entries: a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_in(directory: Path) -> list[str]:
    """Every file under `directory`, as paths relative to it."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def _step_of(name: str) -> int | None:
    prefix, _, number = name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks (about 0.2 s per 100 MB on one core: docs/reliability.md)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fields_sha256(meta: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != META_SHA256}, sort_keys=True).encode()
                          ).hexdigest()


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _write_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed save (DCP wraps each rank's error in a CheckpointException), if any: the file
    system's, or a ConnectionError from the pipe to an async save's writer process, which ended."""
    pending = [error]
    while pending:
        e = pending.pop()
        if isinstance(e, OSError):
            return e
        if isinstance(e, CheckpointException):
            pending += [exc for exc, _trace in e.failures.values()]
        pending += [c for c in (e.__cause__, e.__context__) if c is not None]
    return None


class _ErrnoKeepingWriter(dcp.FileSystemWriter):
    """FileSystemWriter that raises a failed write's OSError itself. torch.save reports a failed file write as
    RuntimeError("unexpected pos ..."), the OSError only as its __context__, which DCP loses when it gathers
    every rank's exception; the errno tells a full disk from other failures."""

    def write_data(self, plan, planner):
        try:
            return super().write_data(plan, planner)
        except Exception as e:
            if (cause := _write_error(e)) is None:
                raise
            raise cause from None


def lower_this_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority (nice 19), so that where training keeps every core busy
    (a CPU run) a background save's write and hashing take only the cycles training leaves: for the hasher thread
    and the writer process, never training's thread (an unprivileged process could not raise it again). Linux
    sets nice per thread; elsewhere it would apply to the whole process, so there it does nothing. Best effort:
    a refusal leaves the priority as it was."""
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


class _BackgroundWriter(_ErrnoKeepingWriter):
    """The writer of an async save. DCP runs it in a process of its own (AsyncCheckpointerType.PROCESS): its
    Python work, a pickler per tensor, then holds that process's GIL rather than the one training needs between
    operators. Its first call in that process (set_up_storage_writer of the start-up save; every save runs on the
    process's main thread) sets the process up for good: the writing thread at the lowest priority, DCP's
    per-save log lines (INFO, on stderr) kept out of the run's output, the signals that stop a run ignored
    (SIGINT, SIGTERM, SIGUSR1: a terminal, Slurm or torchrun send them to every process of the run) so that a save
    in flight when training is told to stop is still written for it to publish, the objects the process holds then
    (torch's, which a full garbage collection walked in 0.12-0.18 s of a save every few saves: docs/checkpoints.md)
    frozen, and the process ending with the training process that made this writer (_exit_with_parent). The
    training process ends the writer process as it exits (_end_at_exit)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.training_pid = os.getpid()  # made in the training process, pickled to the writer process

    def set_up_storage_writer(self, *args, **kwargs):
        global _writer_process_set_up
        if os.getpid() != self.training_pid and not _writer_process_set_up:
            _writer_process_set_up = True
            lower_this_thread_priority()
            logging.getLogger().setLevel(logging.WARNING)  # the process's root logger, which DCP set to INFO
            for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                signal.signal(stop, signal.SIG_IGN)
            gc.freeze()
            _exit_with_parent(self.training_pid)
        return super().set_up_storage_writer(*args, **kwargs)


_writer_process_set_up = False  # in DCP's writer process: whether its first save has set it up


def _exit_with_parent(parent: int) -> None:
    """End this process (DCP's writer process) once `parent`, the training process that started it, has ended
    without ending it (SIGKILLed, or killed by the OOM killer, mid-save): an orphaned writer would go on writing a
    staging directory that a rerun of the run removes as a leftover, or writes again when it saves the same step.
    Polled every half second: the kernel's parent-death signal follows the thread that started a process, here a
    thread of DCP's that ends after the first save. At once if `parent` has ended already."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-training-process", daemon=True).start()


def _end_at_exit(writers: list[multiprocessing.Process]) -> None:
    """Kill DCP's writer process as this process exits. multiprocessing's exit handler (atexit in a main process,
    the end of a multiprocessing child's run) would send it the SIGTERM it ignores and wait for it forever; it
    runs the finalizers of priority >= 0 first. Every save has been waited for by then, or the run failed and
    its unpublished one is never read."""
    def end():
        for writer in writers:
            writer.kill()
            writer.join()
    multiprocessing.util.Finalize(None, end, exitpriority=0)


def on_rank0(rank: int, action: Callable[[], None]) -> OSError | None:
    """Run `action` (file operations only rank 0 makes) on rank 0; every rank gets the OSError it raised, or None.
    Collective: the other ranks would otherwise wait for a failed rank 0 in their next collective until the
    timeout, rather than refuse alike."""
    failure = [None]
    if rank == 0:
        try:
            action()
        except OSError as e:
            failure = [e]
    dist.broadcast_object_list(failure, src=0)
    return failure[0]


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, rank: int, async_save: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.async_save = async_save
        # async: the gloo group of the background write's collectives, apart from training's; made here, where every
        # rank constructs its Checkpointer at start-up, rather than in the step that first saves
        self._group = dist.new_group(backend="gloo") if async_save else None
        self._hasher = ThreadPoolExecutor(max_workers=1, initializer=lower_this_thread_priority) if async_save else None
        # async: the copy of the state, in shared memory (pinned where CUDA is), kept for every later save; the
        # writer process maps it by file name (torch's file_system sharing: passing a descriptor per tensor took
        # one round trip each through this process's GIL, ~0.5 s a save here)
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=True,
                                                    use_async_staging=False, use_non_blocking_copy=False)
                                     ) if async_save else None
        if async_save:
            torch.multiprocessing.set_sharing_strategy("file_system")
        self._writer_started = self._start_writer() if async_save else None
        self._pending = None  # async: (step, meta, staging directory, future of this rank's checksums share)

    def _start_writer(self) -> Future:
        """Start DCP's writer process now, at start-up, rather than in the first save's step: it imports torch,
        seconds of CPU that would otherwise stall training's next steps. DCP starts it with its first async save,
        so this one saves an empty state into a directory of this rank's own, removed once written. A process
        that started it before (an earlier run in the same process) keeps it."""
        scratch = Path(tempfile.mkdtemp(prefix="shardwright-writer-start-"))
        children = {child.pid for child in multiprocessing.active_children()}
        started = dcp.async_save({}, checkpoint_id=scratch, storage_writer=_BackgroundWriter(scratch),
                                 process_group=self._group, async_stager=self._stager,
                                 async_checkpointer_type=AsyncCheckpointerType.PROCESS)

        def started_or_failed(_):
            shutil.rmtree(scratch, ignore_errors=True)
            _end_at_exit([child for child in multiprocessing.active_children() if child.pid not in children])

        started.add_done_callback(started_or_failed)
        return started

    def latest_dir(self) -> Path | None:
        """The checkpoint directory `latest` points at (not yet verified: check_complete); None for a fresh run."""
        pointer = self.root / "latest"
        return self._checkpoint_named(pointer.read_text().strip()) if pointer.exists() else None

    def _checkpoint_named(self, name: str) -> Path:
        """The checkpoint directory `latest` names, or the refusal saying it names none."""
        path = self.root / name
        if _step_of(name) is None or not path.is_dir():
            raise UserError(f"{self.root / 'latest'} points at '{name}', which is not a checkpoint directory; "
                            f"point it at an existing checkpoints/step-<N>, or use a new run.dir to start over")
        return path

    def last_complete(self) -> str:
        """The checkpoint `latest` names, for messages."""
        pointer = self.root / "latest"
        return f"{pointer.read_text().strip()} (checkpoints/latest)" if pointer.exists() else "none (none saved yet)"

    def resume_point(self, fallback: bool, check: Callable[[Path], dict] | None = None,
                     agree: Callable[[tuple], tuple] = lambda candidates: candidates
                     ) -> tuple[Path | None, dict | None]:
        """(checkpoint, check of it) a run resumes from: the one `latest` names, verified by `check`
        (check_complete, or check_complete_everywhere in a world). If it fails verification (or `latest` names no
        checkpoint directory) and `fallback`, the newest earlier checkpoint that passes (checksums recorded and
        matching), its record noting under "fallback" what was skipped and why; otherwise the refusal. In a world,
        `agree` (as_rank0_sees) gives every rank rank 0's reading of `latest` and of the earlier checkpoints, so
        that all ranks verify the same ones in the same order."""
        check = check or check_complete
        named, not_a_checkpoint, earlier = agree(self._resume_candidates())
        if named is None:
            return None, None
        try:
            if not_a_checkpoint is not None:
                raise UserError(not_a_checkpoint)
            return self.root / named, check(self.root / named)
        except UserError as refusal:
            if not fallback:
                raise UserError(f"{refusal}; or set checkpoint.fallback=true to resume from the newest verified "
                                f"earlier checkpoint") from None
            for path in earlier:
                try:
                    saved = check(path)
                except UserError:
                    continue
                if saved["verified"]:
                    return path, {**saved, "fallback": f"{self.root / named} failed verification ({refusal})"}
            raise UserError(f"{refusal}; checkpoint.fallback=true found no verified earlier checkpoint in "
                            f"{self.root}") from None

    def _resume_candidates(self) -> tuple[str | None, str | None, list[Path]]:
        """(the name `latest` holds, None for a fresh run; why it names no checkpoint directory, or None; the
        checkpoints earlier than it, newest first: every one when it names no step-<N>)."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None, None, []
        named, refusal = pointer.read_text().strip(), None
        try:
            self._checkpoint_named(named)
        except UserError as e:
            refusal = str(e)
        below = _step_of(named)
        earlier = sorted(((s, p) for p in self.root.iterdir()
                          if (s := _step_of(p.name)) is not None and (below is None or s < below) and p.is_dir()),
                         reverse=True)
        return named, refusal, [path for _, path in earlier]

    def save(self, step: int, state: dict, meta: dict, write_more: Callable[[Path], None] | None = None
             ) -> Path | None:
        """Write `state` as checkpoints/step-<step> with meta.json (plus the files' checksums), publish it and
        prune; the published path. `write_more(staging directory)`, called on every rank after DCP's save, adds
        files of an engine's own format (launcher/deepspeed_engine.py), covered by the same checksums and
        publish. Every rank calls it; a failed write (a full disk) removes the staging directory and raises the
        same UserError on every rank.

        With async_save (torch engine only, no `write_more`) the state is copied in memory and written and
        hashed by background threads while training goes on; it returns None, and poll() or wait() publishes
        the checkpoint once every rank's write is done. A save still pending is published first."""
        self.wait()
        staging = self.root / f".staging-step-{step}"

        def make_staging():
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(".staging-step-*"):
                shutil.rmtree(leftover)
            staging.mkdir()

        if (failure := on_rank0(self.rank, make_staging)) is not None:
            self._refuse_failed_write(step, staging, failure)
        if self.async_save:
            if write_more is not None:
                raise ValueError("async_save writes DCP state only: an engine's own files are written synchronously")
            if self._writer_started is not None:  # the first save: the writer process must be up
                started, self._writer_started = self._writer_started, None
                try:
                    started.result()
                except Exception as e:
                    raise UserError(f"checkpoint.async_save=true: DCP's writer process did not start ({e}); set "
                                    f"checkpoint.async_save=false to save synchronously") from None
            # Copies every tensor into the staged copy (CPU too), then the writer process writes it.
            written = dcp.async_save(state, checkpoint_id=staging, storage_writer=_BackgroundWriter(staging),
                                     process_group=self._group, async_stager=self._stager,
                                     async_checkpointer_type=AsyncCheckpointerType.PROCESS)
            self._pending = (step, meta, staging, self._hasher.submit(self._hash_share, staging, written, self._group))
            return None
        try:
            # Raises on every rank if any rank's write failed.
            dcp.save(state, checkpoint_id=staging, storage_writer=_ErrnoKeepingWriter(staging))
            if write_more is not None:
                write_more(staging)
        except (Exception, CheckpointException) as e:
            self._refuse_failed_write(step, staging, e)
        return self._publish(step, meta, staging, self._hash_share(staging))

    def poll(self) -> Path | None:
        """Publish the pending async save if every rank's write is done (one tiny all-reduce while one is
        pending, so that all ranks publish after the same step); its path, else None. Every rank calls it."""
        if self._pending is None:
            return None
        done = all_reduce_number(float(self._pending[3].done()), op=dist.ReduceOp.MIN)
        return self.wait() if done else None

    def wait(self) -> Path | None:
        """Wait for the pending async save's write and publish it; its path, None if none is pending. Every rank
        calls it (at the next save, and before the run ends or stops)."""
        if self._pending is None:
            return None
        step, meta, staging, share = self._pending
        self._pending = None
        try:
            share = share.result()
        except (Exception, CheckpointException) as e:
            self._refuse_failed_write(step, staging, e)
        return self._publish(step, meta, staging, share)

    def _hash_share(self, staging: Path, written: Future | None = None, group: dist.ProcessGroup | None = None
                    ) -> dict[str, str] | OSError:
        """SHA-256 of this rank's share of the checkpoint's files, once `written` (an async save's write) is done
        (collective over `group`, all ranks). The files are the union of what the ranks list in `staging`: a rank
        lists at least the files it wrote, where a network file system may show it other nodes' new files late,
        so no rank's listing alone is complete. File i of the union is hashed by the (i mod k)-th of the k ranks
        that listed it: once, by a rank that sees it (rank i mod world size where every rank sees every file).
        A file this rank cannot read is returned as the OSError, for _publish to refuse on every rank."""
        if written is not None:
            written.result()
        listings = [None] * dist.get_world_size(group)
        dist.all_gather_object(listings, files_in(staging), group=group)
        listed_by: dict[str, list[int]] = {}
        for rank, listing in enumerate(listings):
            for name in listing:
                listed_by.setdefault(name, []).append(rank)
        try:
            return {name: file_sha256(staging / name) for i, name in enumerate(sorted(listed_by))
                    if listed_by[name][i % len(listed_by[name])] == self.rank}
        except OSError as e:
            return e

    def _publish(self, step: int, meta: dict, staging: Path, share: dict[str, str] | OSError) -> Path:
        """rank 0 writes meta.json with every rank's checksums, renames staging to step-<step>, moves `latest`.
        A rank that could not hash its share (`share` an OSError) fails the save on every rank: gathered with the
        shares, rather than raised there alone while the others wait for it in this gather until the timeout."""
        final = self.root / f"step-{step}"
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, share)
        if (failure := next((s for s in shares if isinstance(s, OSError)), None)) is not None:
            self._refuse_failed_write(step, staging, failure)

        def publish():
            record = {"step": step, **meta, FILES_SHA256: {k: v for share in shares for k, v in sorted(share.items())}}
            _write_atomically(staging / META_FILE,
                              json.dumps({**record, META_SHA256: _fields_sha256(record)}, indent=1))
            if final.exists():  # left by a crash after publish but before `latest` moved: never current
                shutil.rmtree(final)
            os.rename(staging, final)
            fsync_path(self.root)
            _write_atomically(self.root / "latest", final.name)

        if (failure := on_rank0(self.rank, publish)) is not None:
            self._refuse_failed_write(step, staging, failure)
        if self.rank == 0:  # best effort, after the checkpoint is published: nothing in it can fail the save
            self._prune(keep=final.name)
        return final

    def _refuse_failed_write(self, step: int, staging: Path, error: BaseException) -> None:
        cause = _write_error(error)
        if cause is None:
            raise error
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(cause, ConnectionError):
            raise UserError(f"DCP's writer process ended while writing the async save of step {step} (killed from "
                            f"outside? {type(cause).__name__}: {cause}); the last complete checkpoint is "
                            f"{self.last_complete()}, and the partial one was removed: rerun to resume from it") from None
        space = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file size limit reached"}.get(cause.errno)
        fix = "free space" if space else f"fix what {cause.filename or 'the file system'} refused"
        raise UserError(f"{space or 'file access failed'} on the file system at {_mount_point(self.root)} while saving step "
                        f"{step} ({errno.errorcode.get(cause.errno, cause.errno)}: {cause.strerror}); the last "
                        f"complete checkpoint is {self.last_complete()}, and the partial one was removed: {fix} "
                        f"and rerun to resume from it") from None

    def load(self, path: Path, state: dict, read_more: Callable[[Path], None] | None = None) -> None:
        """`state` from the checkpoint at `path` (verified by check_complete), then `read_more(path)`: the files
        `write_more` added at save."""
        if isinstance(optimizer := state.get("optimizer"), OptimizerState):
            optimizer.per_parameter_options = any(key.startswith(f"optimizer.{_GROUP_PREFIX}")
                                                  for key in read_metadata(path).state_dict_metadata)
        safe_load(state, path)
        if read_more is not None:
            read_more(path)

    def _prune(self, keep: str) -> None:
        """Delete all but the newest keep_last checkpoints; never `keep`, the one just saved and verified."""
        try:
            steps = sorted((s, p) for p in self.root.iterdir() if (s := _step_of(p.name)) is not None)
        except OSError:  # the next save's prune tries again
            return
        for _, path in steps[:-self.keep_last] if self.keep_last > 0 else []:
            if path.name != keep:
                # Best effort (e.g. NFS keeps a file another process holds open): what is left is never `latest`,
                # fails verification if a fallback comes to it, and the next save's prune tries again.
                shutil.rmtree(path, ignore_errors=True)


def check_complete(path: Path, share: tuple[int, int] | None = None) -> dict:
    """Verify a checkpoint before anything reads its tensors: meta.json (its fields' checksum), the SHA-256 of every
    file recorded at save, the DCP metadata (restricted unpickling), and every shard holding the bytes it says.
    `share` (rank, world size): hash only this rank's share of the shard files (every rank still hashes the DCP
    metadata before unpickling it); check_complete_everywhere makes the ranks' verdicts one.

    Returns the DCP metadata's per-key tensor sizes and dtypes, the meta.json contents under "meta", the keys, and
    "verified": whether checksums were recorded (checkpoints saved before they were are loaded unverified).
    """
    def damaged(why: str) -> UserError:
        return UserError(f"checkpoint {path} is damaged ({why}); point checkpoints/latest at an earlier "
                         f"step-<N>, or use a new run.dir to start over")

    try:
        meta = json.loads((path / META_FILE).read_bytes().decode())
    except (OSError, ValueError) as e:
        raise damaged(f"{META_FILE}: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or (META_SHA256 in meta and meta[META_SHA256] != _fields_sha256(meta)):
        raise damaged(f"{META_FILE} does not match its checksum")
    recorded = meta.get(FILES_SHA256) or {}
    shards = sorted(name for name in recorded if name != METADATA_FILE)
    hashed = ([METADATA_FILE] if METADATA_FILE in recorded else []) + (shards[share[0]::share[1]] if share else shards)
    for name in hashed:  # first: a damaged .metadata is named before it is unpickled
        if not (path / name).is_file():
            raise damaged(f"{name} is missing")
        try:
            digest = file_sha256(path / name)
        except OSError as e:  # unreadable (EACCES, EIO) or gone since is_file: a refusal, on every rank of a world
            raise damaged(f"{name} could not be read: {type(e).__name__}: {e.strerror or e}") from None
        if digest != recorded[name]:
            raise damaged(f"{name} does not match its checksum")
    metadata = read_metadata(path)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        file = path / name
        if not file.exists() or file.stat().st_size < size:
            have = file.stat().st_size if file.exists() else "missing"
            raise damaged(f"shard {name} should hold {size} bytes, has {have}")
    tensors = {key: md for key, md in metadata.state_dict_metadata.items() if hasattr(md, "size")}
    return {"sizes": {key: tuple(md.size) for key, md in tensors.items()},
            "dtypes": {key: md.properties.dtype for key, md in tensors.items()},
            "meta": meta, "keys": set(metadata.state_dict_metadata), "verified": meta.get(FILES_SHA256) is not None}


def check_complete_everywhere(path: Path) -> dict:
    """check_complete of `path` by every rank of the world, each hashing its share of the shard files (a
    checkpoint is read once in all, not once per rank); the first refusal of any rank, in rank order, is raised on
    every rank, so that all ranks resume from the same checkpoint or none does."""
    failure = None
    try:
        saved, refusal = check_complete(path, share=(dist.get_rank(), dist.get_world_size())), None
    except UserError as e:
        saved, refusal = None, str(e)
    except Exception as e:  # a bug, not the checkpoint's fault: still gathered, so no rank waits for this one
        saved, refusal, failure = None, f"rank {dist.get_rank()} failed verifying {path}: {type(e).__name__}: {e}", e
    refusals = [None] * dist.get_world_size()
    dist.all_gather_object(refusals, refusal)
    if failure is not None:
        raise failure  # with its traceback, where it happened
    first = next((r for r in refusals if r is not None), None)
    if first is not None:
        raise UserError(first)
    return saved


def as_rank0_sees(value):
    """`value` as rank 0 computed it, on every rank (a broadcast): what rank 0 read from the file system, where the
    nodes of a network file system may briefly see different contents (attribute caching)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def find_checkpoint(source: Path) -> tuple[Path, Path]:
    """(checkpoint directory, run directory) of SOURCE: a run directory or one of its checkpoints/step-<N>."""
    if (source / META_FILE).is_file():
        checkpoint, run_dir = source, source.parent.parent
    elif not source.is_dir():
        what = "is a file" if source.exists() else "does not exist"
        raise UserError(f"{source} {what}; pass a run directory or one of its checkpoints/step-<N>")
    elif (checkpoint := Checkpointer(source, keep_last=0, rank=0).latest_dir()) is not None:
        run_dir = source
    else:
        raise UserError(f"{source} is neither a run directory with a checkpoint (checkpoints/latest) nor a "
                        f"checkpoints/step-<N> directory")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} has no config.yaml (train writes it there): pass the run directory of a "
                        f"`shardwright train` run or one of its checkpoints/step-<N>")
    return checkpoint, run_dir


def check_same_model(saved: dict, family: str, model: dict, path: Path) -> None:
    """Refuse a checkpoint of another family or architecture (execution fields may differ)."""
    if saved.get("family") != family:
        raise UserError(f"{path} holds a {saved.get('family')} model, not a {family} one; use a new run.dir or the "
                        f"checkpoint's model config")
    saved_model = saved.get("model", {})
    diff = {k: (saved_model.get(k), v) for k, v in model.items() if saved_model.get(k) != v}
    if diff:
        raise UserError(f"{path} holds a {saved.get('family')} model with a different shape "
                        f"({', '.join(f'{k}: checkpoint {a} vs config {b}' for k, (a, b) in diff.items())}); "
                        f"use a new run.dir or the checkpoint's model config")


def check_same_tokenizer(saved: dict, current: dict, path: Path) -> None:
    if saved.get("tokenizer") != current["tokenizer"]:
        raise UserError(f"{path} was trained with tokenizer {saved.get('tokenizer')} but the current data settings "
                        f"give tokenizer {current['tokenizer']}; restore the data section it was trained with "
                        f"(checkpoint: {saved.get('data')}) or use a new run.dir")
