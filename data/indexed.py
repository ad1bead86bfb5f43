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


def open_indexed(prefix: Path):
    """Open prefix.bin/.idx as a megatron IndexedDataset, after checking that the pair is
    whole and belongs together (megatron itself would read garbage or crash)."""
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
    return indexed_dataset.IndexedDataset(str(prefix))
