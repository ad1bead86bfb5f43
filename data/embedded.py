"""Prepare the embedded corpus once per cache dir: tokenizer + megatron train/valid datasets."""

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from data.corpus import SOURCES, embedded_documents, text_files
from data.errors import DataError
from data.indexed import open_indexed, token_dtype, write_indexed
from data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["PreparedData", "prepare_embedded", "open_indexed"]

FORMAT_VERSION = 2  # 2: copies of a text on one side of the train/valid split
_DATA_FILES = ("tokenizer.model", "train.bin", "train.idx", "valid.bin", "valid.idx")


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train_prefix: Path
    valid_prefix: Path
    num_train_tokens: int
    num_valid_tokens: int


def prepare_embedded(
    source: str, vocab_size: int, cache_dir: Path, valid_fraction: float, log=print
) -> PreparedData:
    """Build (or reuse) cache_dir/<source>-v<vocab_size>-valid<valid_fraction>: a directory per setting that
    shapes its contents, so that runs with another split never rebuild (or delete) a cache another run reads.
    Safe to call from every rank at once: a file lock lets one process build while the others wait, then reuse
    its result."""
    if not 0 < valid_fraction < 1:
        raise DataError(
            f"valid_fraction must be between 0 and 1 (exclusive), got {valid_fraction}: "
            "use e.g. 0.05"
        )
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if source in SOURCES:
        name, stamp = source, None
    else:  # a path: keyed by where it is, rebuilt when any file changes
        files = text_files(source)
        resolved = str(Path(source).expanduser().resolve())
        name = f"{Path(resolved).stem}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
        stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    target = cache_dir / f"{name}-v{vocab_size}-valid{valid_fraction:g}"
    settings = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "source_files": stamp,
        "vocab_size": vocab_size,
        "valid_fraction": valid_fraction,
        # The embedded text changes between CPython releases.
        "python": platform.python_version(),
    }
    with _locked(cache_dir / ".lock"):
        problem = _cache_problem(target, settings)
        if problem is None:
            log(f"using cached data at {target}")
        else:
            if target.exists():
                log(f"rebuilding {target}: {problem}")
            _build(target, settings, log)
    manifest = json.loads((target / "manifest.json").read_text())
    return PreparedData(
        tokenizer=Tokenizer(target / "tokenizer.model"),
        train_prefix=target / "train",
        valid_prefix=target / "valid",
        num_train_tokens=manifest["num_train_tokens"],
        num_valid_tokens=manifest["num_valid_tokens"],
    )


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        yield


def _cache_problem(target: Path, settings: dict) -> str | None:
    """Why the cache at target cannot be reused, or None if it can."""
    try:
        manifest = json.loads((target / "manifest.json").read_text())
    except (OSError, ValueError):
        return "no readable manifest.json"
    for key, value in settings.items():
        if manifest.get(key) != value:
            return f"it was built with {key}={manifest.get(key)!r}, not {value!r}"
    for name in _DATA_FILES:
        if not (target / name).is_file():
            return f"{name} is missing"
    try:
        fingerprint = Tokenizer(target / "tokenizer.model").fingerprint
    except DataError:
        return "tokenizer.model is unreadable"
    if fingerprint != manifest["tokenizer_fingerprint"]:
        return "tokenizer.model does not match the manifest"
    itemsize = token_dtype(settings["vocab_size"])().itemsize
    for split in ("train", "valid"):
        if (target / f"{split}.bin").stat().st_size != manifest[f"num_{split}_tokens"] * itemsize:
            return f"{split}.bin does not match the manifest"
    return None


def _build(target: Path, settings: dict, log) -> None:
    """Build into a sibling dir and rename it into place, so a crash never leaves half a cache."""
    start = time.perf_counter()
    documents = embedded_documents(settings["source"])
    if len(documents) < 2:
        raise DataError(
            f"corpus {settings['source']!r} has {len(documents)} documents; "
            "a train/valid split needs at least 2"
        )
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed build
    partial.mkdir()
    try:
        manifest = _write_cache(partial, documents, settings, log)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    log(
        f"done: {manifest['num_train_tokens']} train tokens, {manifest['num_valid_tokens']} "
        f"valid tokens in {time.perf_counter() - start:.1f}s ({target})"
    )


def _write_cache(out_dir: Path, documents: list[str], settings: dict, log) -> dict:
    vocab_size = settings["vocab_size"]
    log(f"training tokenizer (vocab {vocab_size}) on {len(documents)} documents...")
    tokenizer = Tokenizer(train_tokenizer(documents, out_dir / "tokenizer", vocab_size))
    (out_dir / "tokenizer.vocab").unlink()  # a human-readable copy that nothing reads

    log(f"tokenizing {len(documents)} documents...")
    is_valid = _valid_split(documents, settings["valid_fraction"])
    num_tokens = {}
    for split, wanted in (("train", False), ("valid", True)):
        tokenized = (
            tokenizer.encode(doc) + [tokenizer.eos_id]
            for doc, valid in zip(documents, is_valid)
            if valid == wanted
        )
        num_tokens[split] = write_indexed(out_dir / split, tokenized, token_dtype(vocab_size))

    manifest = {
        **settings,
        "num_train_documents": is_valid.count(False),
        "num_valid_documents": is_valid.count(True),
        "num_train_tokens": num_tokens["train"],
        "num_valid_tokens": num_tokens["valid"],
        "tokenizer_fingerprint": tokenizer.fingerprint,
    }
    # Written last: a cache dir with a manifest is complete.
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _valid_split(documents: list[str], valid_fraction: float) -> list[bool]:
    """Which documents are validation: in the order of a hash of their text, those that still
    fit in valid_fraction of all characters (sizes vary 1000-fold, so counting documents would
    not do). At least the smallest document if none fits; the rest are train. The copies of a
    text (the stdlib corpus repeats some docstrings) go to one side together: a text in both
    would be validated on what was trained on."""
    copies: dict[bytes, list[int]] = {}
    for i, doc in enumerate(documents):
        copies.setdefault(_text_hash(doc), []).append(i)
    if len(copies) < 2:
        raise DataError(f"the corpus has {len(copies)} distinct document(s); a train/valid split needs at least 2")
    budget = valid_fraction * sum(len(doc) for doc in documents)
    is_valid = [False] * len(documents)

    def make_valid(text: bytes) -> None:
        for i in copies[text]:
            is_valid[i] = True

    for text in sorted(copies):
        size = sum(len(documents[i]) for i in copies[text])
        if size <= budget:
            make_valid(text)
            budget -= size
    if not any(is_valid):
        make_valid(_text_hash(min(documents, key=len)))
    return is_valid


def _text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()
