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

import functools
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
    check_num_proc(num_proc)
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    output = check_output_location(output)
    files = resolve_inputs(list(inputs), fmt, output)
    tok = load_tokenizer(tokenizer)
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
    existing = already_prepared(output, settings, FORMAT, FORMAT_VERSION, ("",), force)
    if existing is not None:
        log(f"{output} is already prepared ({existing['num_documents']} documents, {existing['num_tokens']} "
            "tokens) from the same inputs and settings: nothing to do (pass --force to rebuild)")
        return existing
    manifest = build_and_publish(output, lambda partial: _build(files, partial, tok, settings, fmt, num_proc,
                                                                progress, log))
    stats = manifest["stats"]
    log(f"prepared {output}: {manifest['num_documents']} documents ({manifest['num_dropped_empty']} empty "
        f"dropped), {manifest['num_tokens']} tokens in {len(manifest['shards'])} shard(s) from {len(files)} "
        f"file(s) in {stats['seconds']:.1f}s: {stats['documents_per_s']:.0f} docs/s, "
        f"{stats['tokens_per_s']:.0f} tokens/s")
    return manifest


# --- pieces every prepare shares (text here, image-text in data/prepare_images.py) --------------------------------

def check_num_proc(num_proc: int) -> None:
    if num_proc < 1:
        raise DataError(f"--num-proc must be >= 1, got {num_proc}")


def check_output_location(output: str | Path) -> Path:
    """OUTPUT as a Path, refused when a parent of it is a file."""
    output = Path(output).expanduser()
    nearest = next(parent for parent in output.absolute().parents if parent.exists())
    if not nearest.is_dir():
        raise DataError(f"--output {output} is under {nearest}, which is a file, not a directory: choose an --output "
                        f"whose parents are directories")
    return output


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer, refused without an EOS piece (documents need one to end them)."""
    tok = Tokenizer(Path(path).expanduser())
    if tok.eos_id < 0:
        raise DataError(f"tokenizer {tok.model_path} has no EOS piece: documents need one to end them; "
                        "train one with `shardwright tokenizer train`")
    return tok


def already_prepared(output: Path, settings: dict, format_name: str, format_version: int,
                     store_suffixes: tuple[str, ...], force: bool) -> dict | None:
    """The manifest of a finished OUTPUT made from these settings when there is nothing to do; None when OUTPUT
    is to be built (absent, or replaced with `force`). Refuses to replace anything but a prepared dataset, or
    one made otherwise without `force`. Each shard NAME has a NAME{suffix}.bin/.idx pair per store suffix."""
    if not output.exists():
        return None
    if not output.is_dir() or (any(output.iterdir()) and not (output / MANIFEST).is_file()):
        raise DataError(f"{output} exists and is not a prepared dataset: choose another --output "
                        "(--force only replaces prepared datasets)")
    problem = _reuse_problem(output, settings, format_name, format_version, store_suffixes)
    if problem is None and not force:
        return json.loads((output / MANIFEST).read_text())
    if problem is not None and not force:
        raise DataError(f"{output} already exists and {problem}: pass --force to replace it, "
                        "or choose another --output")
    return None


def build_and_publish(output: Path, build) -> dict:
    """build(directory) writes a dataset into a hidden sibling of OUTPUT and returns its manifest; then it is
    renamed into place. A failed build (any exception) leaves no trace and OUTPUT as it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(output)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        manifest = build(partial)
        _publish(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _reuse_problem(output: Path, settings: dict, format_name: str, format_version: int,
                   store_suffixes: tuple[str, ...]) -> str | None:
    """Why OUTPUT is not a finished dataset made from these settings, or None if it is."""
    try:
        manifest = json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):
        return "is not a finished prepared dataset (no readable manifest.json)"
    if manifest.get("format") != format_name or manifest.get("format_version") != format_version:
        return "was made by another version or kind of prepare"
    for key, value in settings.items():
        if manifest.get("settings", {}).get(key) != value:
            what = "the input files changed" if key == "inputs" else f"it was made with {key}=" \
                f"{manifest.get('settings', {}).get(key)!r}, not {value!r}"
            return what
    for shard in manifest["shards"]:
        for store in store_suffixes:
            for suffix in (".bin", ".idx"):
                if not (output / f"{shard['name']}{store}{suffix}").is_file():
                    return f"its {shard['name']}{store}{suffix} is missing"
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
    timer = BuildTimer()
    dtype = token_dtype(tok.vocab_size)
    log(f"preparing {len(files)} file(s) with tokenizer {tok.model_path} (vocab {tok.vocab_size}, "
        f"{'BOS + ' if settings['bos'] else ''}EOS per document), {num_proc} tokenizing process(es)")
    writer = ShardWriter(out_dir, {"": dtype}, "tokens", settings["shard_tokens"])
    tasks = _tasks(iter_text_batches(files, settings["text_field"], settings["text_unit"], fmt))
    bos_id = tok.bos_id if settings["bos"] else None
    encode = functools.partial(_encode, bos_id=bos_id, eos_id=tok.eos_id, dtype=dtype)
    bar = progress_bar(progress, " docs")
    dropped = num_tokens = 0
    try:
        for flat, lengths, n_dropped in ordered_map(encode, tasks, num_proc, init_sentencepiece,
                                                    (tok.model_path.read_bytes(),)):
            ends = np.cumsum(lengths)
            for begin, end in zip((ends - lengths).tolist(), ends.tolist()):
                writer.add_document({"": (flat[begin:end], [end - begin])}, tokens=end - begin)
            num_tokens += int(ends[-1]) if len(ends) else 0
            dropped += n_dropped
            bar.update(len(lengths))
            bar.set_postfix_str(f"{num_tokens / timer.seconds() / 1e3:.0f}k tokens/s", refresh=False)
    finally:
        bar.close()
    shards = writer.close()
    if writer.num_documents == 0:
        raise DataError(f"the corpus has no non-empty documents ({dropped} empty ones in "
                        f"{', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}): check the inputs "
                        f"and --text-field")
    shutil.copyfile(tok.model_path, out_dir / "tokenizer.model")
    stats = timer.stats()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset_id": dataset_id(out_dir, tok.fingerprint, [shard["name"] for shard in shards]),
        "settings": settings,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "bos_id": bos_id,
        "eos_id": tok.eos_id,
        "num_documents": writer.num_documents,
        "num_tokens": num_tokens,
        "num_dropped_empty": dropped,
        "shards": shards,
        "stats": {"num_proc": num_proc, "documents_per_s": writer.num_documents / stats["seconds"],
                  "tokens_per_s": num_tokens / stats["seconds"], **stats},
    }
    write_manifest(out_dir, manifest)
    return manifest


class BuildTimer:
    """Wall and CPU time of a build since it was made: of this (reading, writing; the work too when num_proc
    is 1) process and of the worker processes, so where the time goes, whatever else the machine runs."""

    def __init__(self):
        self.started, self.cpu_started, self.workers_started = time.perf_counter(), time.process_time(), \
            _children_cpu()

    def seconds(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def stats(self) -> dict:
        """Seconds, CPU seconds, and the peak resident memory (MiB) of this process (over its life: start-up
        and imports included) and of the largest worker."""
        return {"seconds": self.seconds(), "cpu_seconds_main": time.process_time() - self.cpu_started,
                "cpu_seconds_workers": _children_cpu() - self.workers_started,
                "peak_rss_mib_main": _peak_rss_mib(),
                "peak_rss_mib_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}  # KiB


def _peak_rss_mib() -> float:
    """This process's peak RSS: Linux's VmHWM. Not ru_maxrss, which survives exec: a prepare started by a
    large process would report that process's size."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def dataset_id(out_dir: Path, fingerprint: str, idx_prefixes: list[str]) -> str:
    """What identifies a prepared dataset's content: a digest of its tokenizer and indexes."""
    digest = hashlib.sha256(fingerprint.encode())
    for prefix in idx_prefixes:
        digest.update((out_dir / f"{prefix}.idx").read_bytes())
    return digest.hexdigest()[:16]


def write_manifest(out_dir: Path, manifest: dict) -> None:
    # Written last: a directory with a manifest is complete.
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def progress_bar(progress, unit: str):
    from tqdm import tqdm

    # progress=None: a bar only when stderr is a terminal.
    return tqdm(desc="prepare", unit=unit, unit_scale=True, disable=None if progress is None else not progress,
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


# --- the work, in this process or in workers -----------------------------------------------------------------------

_sp = None  # the worker's SentencePieceProcessor


def init_sentencepiece(model_bytes: bytes) -> None:
    """Load the worker's (or, for num_proc 1, this process's) tokenizer."""
    global _sp
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_proto=model_bytes)


def encode_texts(texts: list[str]) -> list[list[int]]:
    """Token ids of each text, with the tokenizer init_sentencepiece loaded."""
    return _sp.encode(texts, num_threads=1) if texts else []


def _encode(texts: list, bos_id: int | None, eos_id: int, dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokens of the non-empty documents, concatenated, each [BOS] + ids + EOS; their lengths;
    and how many were empty (None, "" or whitespace only) and dropped."""
    keep = [t for t in texts if t and not t.isspace()]
    ids = encode_texts(keep)
    head, tail = ([bos_id] if bos_id is not None else []), [eos_id]
    extra = len(head) + 1
    lengths = np.fromiter((len(x) + extra for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(chain(head, x, tail) for x in ids), dtype=dtype,
                       count=int(lengths.sum()))
    return flat, lengths, len(texts) - len(keep)


def ordered_map(function, tasks, num_proc: int, initializer, initargs: tuple):
    """function over the tasks, results in order: in this process for num_proc 1, else in a pool of
    num_proc processes (each set up by initializer(*initargs)) with a bounded number of tasks in flight."""
    if num_proc == 1:
        initializer(*initargs)
        for task in tasks:
            yield function(task)
        return
    # fork: workers start in milliseconds and need nothing re-imported.
    pool = multiprocessing.get_context("fork").Pool(num_proc, initializer=initializer, initargs=initargs)
    try:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(function, (task,)))
            if len(pending) >= 2 * num_proc:  # bounded: the reader never runs far ahead
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


class ShardWriter:
    """Megatron indexed stores shard-NNNNN{suffix}.bin/.idx, one per suffix of `dtypes` ("" for the tokens),
    each getting one document per add_document; a new shard starts once a shard's count `limit_name` (one of
    add_document's counts) reaches `limit`, so always at a document boundary. The shards' entries count
    documents and every count add_document is given."""

    def __init__(self, out_dir: Path, dtypes: dict[str, type[np.number]], limit_name: str, limit: int):
        self.out_dir, self.dtypes, self.limit_name, self.limit = out_dir, dtypes, limit_name, limit
        self.shards: list[dict] = []
        self.num_documents = 0
        self._builders = None

    def add_document(self, parts: dict[str, tuple[np.ndarray, list[int]]], **counts: int) -> None:
        """parts: per store suffix, the document's values and its sequence lengths."""
        if self._builders is None:
            self._open(counts)
        for suffix, (values, lengths) in parts.items():
            self._builders[suffix].add_document(values, lengths=lengths)
        shard = self.shards[-1]
        shard["documents"] += 1
        for name, count in counts.items():
            shard[name] += count
        self.num_documents += 1
        if shard[self.limit_name] >= self.limit:
            self._finish()

    def close(self) -> list[dict]:
        if self._builders is not None:
            self._finish()
        return self.shards

    def _open(self, counts: dict) -> None:
        name = f"shard-{len(self.shards):05d}"
        indexed_dataset = _megatron_indexed_dataset()
        self._builders = {suffix: indexed_dataset.IndexedDatasetBuilder(str(self.out_dir / f"{name}{suffix}.bin"),
                                                                         dtype=dtype)
                          for suffix, dtype in self.dtypes.items()}
        self.shards.append({"name": name, "documents": 0, **{count: 0 for count in counts}})

    def _finish(self) -> None:
        name = self.shards[-1]["name"]
        for suffix, builder in self._builders.items():
            builder.finalize(str(self.out_dir / f"{name}{suffix}.idx"))
        self._builders = None
