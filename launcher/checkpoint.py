"""DCP checkpoints published atomically under <run.dir>/checkpoints/.

    checkpoints/step-<N>/      a complete DCP checkpoint (.metadata, shard files) + meta.json
    checkpoints/latest         text "step-<N>", replaced atomically once step-<N> is complete

Every rank writes into checkpoints/.staging-step-<N>/; only after all ranks are done does rank 0
rename it to step-<N> and then repoint `latest`. A crash at any moment leaves `latest` at the
previous complete checkpoint; staging leftovers are never read and are cleared on the next save.
"""
import json
import os
import pickle
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from launcher.config import Config
from launcher.errors import UserError
from launcher.optim import Optimizers
from models.spec import architecture
from parallel.mesh import ParallelDims

META_FILE = "meta.json"


class ModelState(Stateful):
    """The parameters of this rank's model parts (one, or one per pipeline stage), keyed by
    canonical names (no FSDP/AC/compile wrappers, no stage prefix), resharded on load."""

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts

    def state_dict(self):
        return {k: v for part in self.parts for k, v in get_model_state_dict(part).items()}

    def load_state_dict(self, state_dict):
        for part in self.parts:
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=False))


class OptimizerState(Stateful):
    """One optimizer per model part, saved flattened by parameter name so any stage split (or none)
    can load it."""

    _OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.pairs = list(zip(parts, optimizers))

    def state_dict(self):
        return {k: v for part, opt in self.pairs
                for k, v in get_optimizer_state_dict(part, opt, options=self._OPTIONS).items()}

    def load_state_dict(self, state_dict):
        for part, opt in self.pairs:
            set_optimizer_state_dict(part, opt, state_dict, options=self._OPTIONS)


class RNGState(Stateful):
    """This rank's generators, stored under its own rank so every rank gets its own stream back."""

    def __init__(self, rank: int):
        self.key = f"rank{rank}"

    def state_dict(self):
        states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                  "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        return {self.key: pickle.dumps(states)}

    def load_state_dict(self, state_dict):
        states = pickle.loads(state_dict[self.key])
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.set_rng_state(states["torch"])
        if states["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


def training_state(parts: list[nn.Module], optimizers: Optimizers, loader: Stateful) -> dict[str, Stateful]:
    """What a checkpoint holds besides each rank's RNG: train saves and resumes it, conversions rewrite it."""
    return {"model": ModelState(parts), "optimizer": OptimizerState(parts, optimizers.optimizers),
            "scheduler": optimizers.schedule_state, "data": loader}


def checkpoint_meta(cfg: Config, tokenizer: str, dims: ParallelDims) -> dict:
    """meta.json of a run's checkpoints (besides the step): what a resume checks (family, architecture,
    tokenizer) and where the checkpoint came from."""
    return {"family": cfg.model.family, "model": architecture(cfg.model_config()), "tokenizer": tokenizer,
            "data": asdict(cfg.data), "layout": asdict(dims)}


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_of(name: str) -> int | None:
    prefix, _, number = name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, rank: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank

    def latest_dir(self) -> Path | None:
        """The checkpoint `latest` points at, checked for completeness; None for a fresh run."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if _step_of(name) is None or not path.is_dir():
            raise UserError(f"{pointer} points at '{name}', which is not a checkpoint directory; "
                            f"point it at an existing checkpoints/step-<N> or delete it to start fresh")
        check_complete(path)
        return path

    def save(self, step: int, state: dict, meta: dict) -> Path:
        staging = self.root / f".staging-step-{step}"
        final = self.root / f"step-{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(".staging-step-*"):
                shutil.rmtree(leftover)
            staging.mkdir()
        dist.barrier()
        dcp.save(state, checkpoint_id=staging)
        dist.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            _write_atomically(staging / META_FILE, json.dumps({"step": step, **meta}, indent=1))
            if final.exists():  # left by a crash after publish but before `latest` moved: never current
                shutil.rmtree(final)
            os.rename(staging, final)
            fsync_dir(self.root)
            _write_atomically(self.root / "latest", final.name)
            self._prune(keep=final.name)
        dist.barrier()
        return final

    def load(self, path: Path, state: dict) -> None:
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as e:  # DCP wraps read errors of any kind
            raise UserError(f"checkpoint {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            f"it is damaged: point checkpoints/latest at an earlier step-<N> or delete it") from e

    def _prune(self, keep: str) -> None:
        steps = sorted((s, p) for p in self.root.iterdir() if (s := _step_of(p.name)) is not None)
        for _, path in steps[:-self.keep_last] if self.keep_last > 0 else []:
            if path.name != keep:
                shutil.rmtree(path)


def check_complete(path: Path) -> dict:
    """Read meta.json and the DCP metadata, and check every shard file holds the bytes it should.

    Catches a truncated or missing shard before any process group starts. Returns the DCP
    metadata's per-key tensor sizes and dtypes plus the meta.json contents under "meta".
    """
    def damaged(why: str) -> UserError:
        return UserError(f"checkpoint {path} is damaged ({why}); point checkpoints/latest at an earlier "
                         f"step-<N> or delete it to start fresh")

    try:
        meta = json.loads((path / META_FILE).read_text())
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise damaged(f"{type(e).__name__}: {e}") from None
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
            "meta": meta, "keys": set(metadata.state_dict_metadata)}


def find_checkpoint(source: Path) -> tuple[Path, Path]:
    """(checkpoint directory, run directory) of SOURCE: a run directory or one of its checkpoints/step-<N>."""
    if (source / META_FILE).is_file():
        checkpoint, run_dir = source, source.parent.parent
    elif not source.is_dir():
        raise UserError(f"{source} does not exist; pass a run directory or one of its checkpoints/step-<N>")
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
    saved_model = saved.get("model", {})
    diff = {k: (saved_model.get(k), v) for k, v in model.items() if saved_model.get(k) != v}
    if saved.get("family") != family or diff:
        raise UserError(f"{path} holds a {saved.get('family')} model with a different shape "
                        f"({', '.join(f'{k}: checkpoint {a} vs config {b}' for k, (a, b) in diff.items())}); "
                        f"use a new run.dir or the checkpoint's model config")


def check_same_tokenizer(saved: dict, current: dict, path: Path) -> None:
    if saved.get("tokenizer") != current["tokenizer"]:
        raise UserError(f"{path} was trained with tokenizer {saved.get('tokenizer')} but the current data settings "
                        f"give tokenizer {current['tokenizer']}; restore the data section it was trained with "
                        f"(checkpoint: {saved.get('data')}) or use a new run.dir")
