"""`shardwright prepare`: raw corpus files -> a prepared dataset directory.

    OUTPUT/
      manifest.json          settings, inputs, counts, shards, tokenizer fingerprint (written last)
      tokenizer.model        the sentencepiece model the tokens come from
      shard-00000.bin/.idx   megatron-core indexed datasets: one megatron document per input
      shard-00001.bin/.idx   document, each [BOS] + tokens + EOS; a new shard starts once one
      ...                    holds `shard_tokens` tokens (always at a document boundary)

Documents keep the order of the input files (sorted) and of the rows within them, so the
output is the same whatever `num_proc` is. The main process reads the files (HF `datasets`,
streaming) and writes shards; `num_proc` worker processes tokenize batches of documents, with
a bounded number of batches in flight. Everything is built in a hidden sibling directory and
renamed into place at the end: a crash or a bad file never leaves a half-written OUTPUT, and a
finished OUTPUT is never touched again unless `force` (re-running is a no-op).
"""

import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import sys
import time
from collections import deque
from itertools import chain
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.indexed import _megatron_indexed_dataset, token_dtype
from data.sources import file_stamps, iter_text_batches, resolve_inputs
from data.tokenizer import Tokenizer

FORMAT = "shardwright-prepared"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 30  # ~2 GiB of uint16 tokens per .bin
TASK_CHARS = 1 << 20  # characters of text per tokenization task
MANIFEST = "manifest.json"


def prepare(inputs: list[str], output: str | Path, tokenizer: str | Path, *, text_field: str = "text",
            text_unit: str = "document", fmt: str | None = None, num_proc: int = 1, bos: bool = False,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, force: bool = False, progress: bool | None = None,
            log=print) -> dict:
    """Tokenize the documents of `inputs` into OUTPUT (see the module docstring); returns the
    manifest. A finished OUTPUT made with the same settings and unchanged inputs is left alone."""
    if num_proc < 1:
        raise DataError(f"--num-proc must be >= 1, got {num_proc}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    output = Path(output).expanduser()
    nearest = next(parent for parent in output.absolute().parents if parent.exists())
    if not nearest.is_dir():
        raise DataError(f"--output {output} is under {nearest}, which is a file, not a directory: choose an --output "
                        f"whose parents are directories")
    files = resolve_inputs(list(inputs), fmt)
    tok = Tokenizer(Path(tokenizer).expanduser())
    if tok.eos_id < 0:
        raise DataError(f"tokenizer {tok.model_path} has no EOS piece: documents need one to end them; "
                        "train one with `shardwright tokenizer train`")
    if bos and tok.bos_id < 0:
        raise DataError(f"tokenizer {tok.model_path} has no BOS piece: drop --bos")
    settings = {
        "inputs": file_stamps(files),
        "format": fmt,
        "text_field": text_field,
        "text_unit": text_unit,
        "tokenizer_fingerprint": tok.fingerprint,
        "bos": bos,
        "shard_tokens": shard_tokens,
    }
    if output.exists():
        if not output.is_dir() or (any(output.iterdir()) and not (output / MANIFEST).is_file()):
            raise DataError(f"{output} exists and is not a prepared dataset: choose another --output "
                            "(--force only replaces prepared datasets)")
        problem = _reuse_problem(output, settings)
        if problem is None and not force:
            manifest = json.loads((output / MANIFEST).read_text())
            log(f"{output} is already prepared ({manifest['num_documents']} documents, {manifest['num_tokens']} "
                "tokens) from the same inputs and settings: nothing to do (pass --force to rebuild)")
            return manifest
        if problem is not None and not force:
            raise DataError(f"{output} already exists and {problem}: pass --force to replace it, "
                            "or choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(output)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        manifest = _build(files, partial, tok, settings, fmt, num_proc, progress, log)
        _publish(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    stats = manifest["stats"]
    log(f"prepared {output}: {manifest['num_documents']} documents ({manifest['num_dropped_empty']} empty "
        f"dropped), {manifest['num_tokens']} tokens in {len(manifest['shards'])} shard(s) from {len(files)} "
        f"file(s) in {stats['seconds']:.1f}s: {stats['documents_per_s']:.0f} docs/s, "
        f"{stats['tokens_per_s']:.0f} tokens/s")
    return manifest


def _reuse_problem(output: Path, settings: dict) -> str | None:
    """Why OUTPUT is not a finished dataset made from these settings, or None if it is."""
    try:
        manifest = json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):
        return "is not a finished prepared dataset (no readable manifest.json)"
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        return "was made by another version of prepare"
    for key, value in settings.items():
        if manifest.get("settings", {}).get(key) != value:
            what = "the input files changed" if key == "inputs" else f"it was made with {key}=" \
                f"{manifest.get('settings', {}).get(key)!r}, not {value!r}"
            return what
    for shard in manifest["shards"]:
        for suffix in (".bin", ".idx"):
            if not (output / f"{shard['name']}{suffix}").is_file():
                return f"its {shard['name']}{suffix} is missing"
    return None


def _remove_stale_partials(output: Path) -> None:
    """Left by a killed prepare; one still running (its pid alive) keeps its own."""
    for partial in output.parent.glob(f".{output.name}.partial-*"):
        try:
            os.kill(int(partial.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass


def _publish(partial: Path, output: Path) -> None:
    """Rename the finished build into place; an existing OUTPUT (--force) is moved aside first
    and deleted only after the new one is in place."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
    os.replace(partial, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build(files, out_dir: Path, tok: Tokenizer, settings: dict, fmt, num_proc: int, progress, log) -> dict:
    _megatron_indexed_dataset()  # slow first import (megatron.core); not part of the throughput
    started, cpu_started, workers_started = time.perf_counter(), time.process_time(), _children_cpu()
    dtype = token_dtype(tok.vocab_size)
    log(f"preparing {len(files)} file(s) with tokenizer {tok.model_path} (vocab {tok.vocab_size}, "
        f"{'BOS + ' if settings['bos'] else ''}EOS per document), {num_proc} tokenizing process(es)")
    writer = _ShardWriter(out_dir, dtype, settings["shard_tokens"])
    tasks = _tasks(iter_text_batches(files, settings["text_field"], settings["text_unit"], fmt))
    bos_id = tok.bos_id if settings["bos"] else None
    bar = _progress_bar(progress)
    dropped = 0
    try:
        for flat, lengths, n_dropped in _tokenized(tasks, tok, bos_id, dtype, num_proc):
            writer.add(flat, lengths)
            dropped += n_dropped
            bar.update(len(lengths))
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{writer.num_tokens / elapsed / 1e3:.0f}k tokens/s", refresh=False)
    finally:
        bar.close()
    shards = writer.close()
    if writer.num_documents == 0:
        raise DataError(f"the corpus has no non-empty documents ({dropped} empty ones in "
                        f"{', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}): check the inputs "
                        f"and --text-field")
    shutil.copyfile(tok.model_path, out_dir / "tokenizer.model")
    seconds = time.perf_counter() - started
    idx_digest = hashlib.sha256(tok.fingerprint.encode())
    for shard in shards:
        idx_digest.update((out_dir / f"{shard['name']}.idx").read_bytes())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset_id": idx_digest.hexdigest()[:16],
        "settings": settings,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "bos_id": bos_id,
        "eos_id": tok.eos_id,
        "num_documents": writer.num_documents,
        "num_tokens": writer.num_tokens,
        "num_dropped_empty": dropped,
        "shards": shards,
        "stats": {"seconds": seconds, "num_proc": num_proc, "documents_per_s": writer.num_documents / seconds,
                  "tokens_per_s": writer.num_tokens / seconds,
                  # CPU time of this (reading, writing; tokenizing too when num_proc is 1) process and of
                  # the tokenizing workers: where the time goes, whatever else the machine runs
                  "cpu_seconds_main": time.process_time() - cpu_started,
                  "cpu_seconds_workers": _children_cpu() - workers_started},
    }
    # Written last: a directory with a manifest is complete.
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _progress_bar(progress):
    from tqdm import tqdm

    # progress=None: a bar only when stderr is a terminal.
    return tqdm(desc="prepare", unit=" docs", unit_scale=True, disable=None if progress is None else not progress,
                file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def _tasks(batches):
    """Regroup (file, texts) read batches into lists of about TASK_CHARS characters."""
    task, chars = [], 0
    for _path, texts in batches:
        for text in texts:
            task.append(text)
            chars += len(text) if text else 0
            if chars >= TASK_CHARS or len(task) >= 8192:
                yield task
                task, chars = [], 0
    if task:
        yield task


# --- tokenization, in this process or in workers ----------------------------------------------------------------

_sp = None  # the worker's SentencePieceProcessor


def _init_worker(model_bytes: bytes) -> None:
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_proto=model_bytes)


def _encode(texts: list, bos_id: int | None, eos_id: int, dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokens of the non-empty documents, concatenated, each [BOS] + ids + EOS; their lengths;
    and how many were empty (None, "" or whitespace only) and dropped."""
    keep = [t for t in texts if t and not t.isspace()]
    ids = _sp.encode(keep, num_threads=1) if keep else []
    head, tail = ([bos_id] if bos_id is not None else []), [eos_id]
    extra = len(head) + 1
    lengths = np.fromiter((len(x) + extra for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(chain(head, x, tail) for x in ids), dtype=dtype,
                       count=int(lengths.sum()))
    return flat, lengths, len(texts) - len(keep)


def _tokenized(tasks, tok: Tokenizer, bos_id, dtype, num_proc: int):
    """_encode over the tasks, in order: in this process for num_proc 1, else in a pool."""
    model_bytes = tok.model_path.read_bytes()
    if num_proc == 1:
        _init_worker(model_bytes)
        for task in tasks:
            yield _encode(task, bos_id, tok.eos_id, dtype)
        return
    # fork: workers start in milliseconds and need nothing re-imported; they only run sentencepiece.
    pool = multiprocessing.get_context("fork").Pool(num_proc, initializer=_init_worker, initargs=(model_bytes,))
    try:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(_encode, (task, bos_id, tok.eos_id, dtype)))
            if len(pending) >= 2 * num_proc:  # bounded: the reader never runs far ahead
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


class _ShardWriter:
    """Appends documents to shard-NNNNN.bin/.idx, starting a new shard after shard_tokens."""

    def __init__(self, out_dir: Path, dtype, shard_tokens: int):
        self.out_dir, self.dtype, self.shard_tokens = out_dir, dtype, shard_tokens
        self.shards: list[dict] = []
        self.num_documents = self.num_tokens = 0
        self._builder = None

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        ends = np.cumsum(lengths)
        for start, end in zip((ends - lengths).tolist(), ends.tolist()):
            if self._builder is None:
                self._open()
            self._builder.add_document(flat[start:end], lengths=[end - start])
            shard = self.shards[-1]
            shard["documents"] += 1
            shard["tokens"] += end - start
            if shard["tokens"] >= self.shard_tokens:
                self._finish()
        self.num_documents += len(lengths)
        self.num_tokens += int(lengths.sum())

    def close(self) -> list[dict]:
        if self._builder is not None:
            self._finish()
        return self.shards

    def _open(self) -> None:
        name = f"shard-{len(self.shards):05d}"
        self._builder = _megatron_indexed_dataset().IndexedDatasetBuilder(str(self.out_dir / f"{name}.bin"),
                                                                          dtype=self.dtype)
        self.shards.append({"name": name, "documents": 0, "tokens": 0})

    def _finish(self) -> None:
        self._builder.finalize(str(self.out_dir / f"{self.shards[-1]['name']}.idx"))
        self._builder = None
