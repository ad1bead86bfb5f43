"""megatron-core indexed datasets (.bin tokens + .idx lengths): write, and open with checks."""

import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from data.errors import DataError

# .idx layout (megatron.core.datasets.indexed_dataset._IndexWriter): 9-byte magic, u64 version,
# u8 dtype code, u64 sequence count, u64 document count, then int32 lengths, int64 pointers,
# int64 document indices.
_MAGIC = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 34


def _megatron_indexed_dataset():
    """megatron's indexed_dataset module, imported lazily: megatron.core is slow to import and
    warns about missing GPU libraries we do not need here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type[np.number]:
    return np.uint16 if vocab_size <= 2**16 else np.int32  # ids go up to vocab_size - 1


def write_indexed(prefix: Path, documents: Iterable[list[int]], dtype: type[np.number]) -> int:
    """Write one megatron document per token list (boundaries kept); returns the token count."""
    builder = _megatron_indexed_dataset().IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    num_tokens = 0
    for tokens in documents:
        builder.add_document(np.asarray(tokens, dtype=dtype), lengths=[len(tokens)])
        num_tokens += len(tokens)
    builder.finalize(f"{prefix}.idx")
    return num_tokens


def open_indexed(prefix: Path, vocab_size: int | None):
    """Open prefix.bin/.idx as a megatron IndexedDataset, after checking that the pair is
    whole and belongs together, that the index is consistent (pointers, document boundaries) and,
    given the tokenizer's vocab_size (None: not known), that every token id is below it. Megatron
    itself would read garbage, fail mid-run, or feed the embedding an id it does not have."""
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    fix = f"delete {Path(prefix).parent} and run prepare again"
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataError(f"indexed dataset file {path} is missing: {fix}")

    indexed_dataset = _megatron_indexed_dataset()
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES or not header.startswith(_MAGIC):
        raise DataError(f"{idx_path} is not a megatron .idx file: {fix}")
    _version, dtype_code, num_sequences, num_documents = struct.unpack("<QBQQ", header[9:])
    try:
        itemsize = indexed_dataset.DType.size(dtype_code)
    except ValueError:
        raise DataError(f"{idx_path} has unknown token dtype code {dtype_code}: {fix}") from None

    idx_bytes = _HEADER_BYTES + num_sequences * (4 + 8) + num_documents * 8
    if idx_path.stat().st_size != idx_bytes:
        raise DataError(
            f"{idx_path} is truncated or corrupt ({idx_path.stat().st_size} bytes, its header "
            f"implies {idx_bytes}): {fix}"
        )
    lengths = np.fromfile(idx_path, dtype=np.int32, count=num_sequences, offset=_HEADER_BYTES)
    bin_bytes = int(lengths.sum(dtype=np.int64)) * itemsize
    if bin_path.stat().st_size != bin_bytes:
        raise DataError(
            f"{bin_path} holds {bin_path.stat().st_size} bytes but {idx_path} describes "
            f"{bin_bytes}: the pair is truncated or from different runs; {fix}"
        )
    if bin_bytes == 0:
        raise DataError(f"{bin_path} holds no tokens: {fix}")
    _check_index(idx_path, num_sequences, num_documents, itemsize, fix)
    if vocab_size is not None:
        _check_token_ids(bin_path, indexed_dataset.DType.dtype_from_code(dtype_code), vocab_size, fix)
    return indexed_dataset.IndexedDataset(str(prefix))


def _check_index(idx_path: Path, num_sequences: int, num_documents: int, itemsize: int, fix: str) -> None:
    """Every sequence length >= 0, every pointer the byte offset where the lengths before it end, and
    document boundaries rising strictly from sequence 0 to the last: vectorized over the mapped file."""
    index = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(index, dtype=np.int32, count=num_sequences, offset=_HEADER_BYTES)
    pointers = np.frombuffer(index, dtype=np.int64, count=num_sequences, offset=_HEADER_BYTES + 4 * num_sequences)
    documents = np.frombuffer(index, dtype=np.int64, count=num_documents, offset=_HEADER_BYTES + 12 * num_sequences)
    if num_sequences and lengths.min() < 0:
        first = int(np.argmax(lengths < 0))
        raise DataError(f"{idx_path} is corrupt: sequence {first} has length {lengths[first]}: {fix}")
    expected = np.zeros(num_sequences, dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
    expected *= itemsize
    wrong = pointers != expected
    if wrong.any():
        first = int(np.argmax(wrong))
        raise DataError(f"{idx_path} is corrupt: the pointer of sequence {first} is {pointers[first]}, but the lengths "
                        f"before it end at byte {expected[first]}: {fix}")
    if num_documents < 2 or documents[0] != 0 or documents[-1] != num_sequences:
        raise DataError(f"{idx_path} is corrupt: its document index should run from sequence 0 to {num_sequences}, "
                        f"but it is {documents[:1].tolist()} ... {documents[-1:].tolist()}: {fix}")
    falling = np.diff(documents) <= 0
    if falling.any():
        first = int(np.argmax(falling))
        raise DataError(f"{idx_path} is corrupt: document {first + 1} starts at sequence {documents[first + 1]}, not "
                        f"after document {first} (sequence {documents[first]}): {fix}")


def _check_token_ids(bin_path: Path, dtype: type[np.number], vocab_size: int, fix: str) -> None:
    """Every token id in [0, vocab_size), vectorized over the mapped file: a max (and a min for signed
    ids), one pass over it; docs/reliability.md gives the cost."""
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    high = int(tokens.max())
    low = int(tokens.min()) if np.issubdtype(dtype, np.signedinteger) else 0  # uint16 ids cannot be negative
    if low < 0 or high >= vocab_size:
        first = int(np.argmax((tokens < 0) | (tokens >= vocab_size)))
        raise DataError(f"{bin_path} is corrupt or from another tokenizer: token {first} has id {tokens[first]}, "
                        f"outside the tokenizer's vocabulary of {vocab_size}: {fix}")
