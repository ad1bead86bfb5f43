"""Damaged prepared data is refused when opened, with one DataError naming the file: random bytes in the
.idx pointer region or document index, a plausible but reordered document index, token ids outside the
vocabulary in the .bin; and `prepare`'s bad inputs say what is wrong."""
import collections
import struct
from pathlib import Path

import numpy as np
import pytest

from data.errors import DataError
from data.indexed import _HEADER_BYTES, open_indexed, write_indexed
from data.prepare import prepare

VOCAB = 1000
FAULTS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def fault_report():
    yield
    print(f"\ndata faults injected: {dict(FAULTS)}")


@pytest.fixture
def dataset(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, VOCAB, size=int(n)).tolist() for n in rng.integers(1, 50, size=200)]
    prefix = tmp_path / "shard"
    write_indexed(prefix, documents, np.uint16)
    return prefix


def regions(prefix: Path) -> dict[str, tuple[int, int]]:
    """(offset, size) in the .idx of its lengths, pointers and document index."""
    header = Path(f"{prefix}.idx").read_bytes()[:_HEADER_BYTES]
    _version, _code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    return {"lengths": (_HEADER_BYTES, 4 * n_seq), "pointers": (_HEADER_BYTES + 4 * n_seq, 8 * n_seq),
            "documents": (_HEADER_BYTES + 12 * n_seq, 8 * n_doc)}


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_intact_data_opens(dataset):
    assert len(open_indexed(dataset, VOCAB)) == 200


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("region", ["pointers", "documents"])
def test_random_bytes_in_the_index(dataset, region, seed):
    rng = np.random.default_rng(seed)
    offset, size = regions(dataset)[region]
    start = offset + int(rng.integers(0, size - 16)) // 8 * 8
    overwrite(Path(f"{dataset}.idx"), start, rng.bytes(16))
    FAULTS[f"random bytes in the .idx {region}"] += 1
    with pytest.raises(DataError, match=rf"{dataset}\.idx is corrupt") as error:
        open_indexed(dataset, VOCAB)
    assert "\n" not in str(error.value)


def test_reordered_document_index(dataset):
    """Plausible values (each a real sequence number), out of order: the split would silently change."""
    offset, _ = regions(dataset)["documents"]
    overwrite(Path(f"{dataset}.idx"), offset + 8 * 10, struct.pack("<qq", 11, 10))
    FAULTS["reordered .idx document index"] += 1
    with pytest.raises(DataError, match=rf"{dataset}\.idx is corrupt: document 11 starts at sequence 10, not after "
                                        r"document 10 \(sequence 11\)"):
        open_indexed(dataset, VOCAB)


@pytest.mark.parametrize("token_id", [VOCAB, 2**16 - 1])
def test_token_id_outside_the_vocabulary(dataset, token_id):
    position = int(np.random.default_rng(token_id).integers(0, Path(f"{dataset}.bin").stat().st_size // 2))
    overwrite(Path(f"{dataset}.bin"), 2 * position, struct.pack("<H", token_id))
    FAULTS["token id outside the vocabulary in the .bin"] += 1
    with pytest.raises(DataError, match=rf"{dataset}\.bin is corrupt or from another tokenizer: token {position} "
                                        rf"has id {token_id}, outside the tokenizer's vocabulary of {VOCAB}"):
        open_indexed(dataset, VOCAB)
    assert len(open_indexed(dataset, vocab_size=None)) == 200  # no tokenizer known: ids not checked


def test_prepare_bad_inputs(tmp_path):
    tokenizer = tmp_path / "no-tokenizer-needed.model"  # both are refused before the tokenizer is read
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match=r"is under .*a-file, which is a file, not a directory"):
        prepare([str(tmp_path)], tmp_path / "a-file" / "out", tokenizer)
    FAULTS["prepare --output under a file"] += 1


def test_unterminated_json_string_is_not_called_non_utf8(tmp_path, data_cache):
    from tests.conftest import cached_tokenizer

    bad = tmp_path / "unterminated.jsonl"
    bad.write_text('{"text": "no closing quote\n')
    with pytest.raises(DataError) as error:
        prepare([str(bad)], tmp_path / "out", cached_tokenizer(data_cache), progress=False, log=lambda _: None)
    assert "is not valid JSON lines or JSON" in str(error.value) and "UTF-8" not in str(error.value), error.value
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl is not valid UTF-8"):
        prepare([str(latin)], tmp_path / "out", cached_tokenizer(data_cache), progress=False, log=lambda _: None)
    FAULTS["prepare: unterminated JSON string / non-UTF-8 file"] += 2
