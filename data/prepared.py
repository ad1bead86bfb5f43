"""A dataset directory written by `shardwright prepare`, opened for training, with its checks,
and its train / valid / test split by documents."""

import json
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.indexed import open_indexed
from data.prepare import FORMAT, FORMAT_VERSION, MANIFEST
from data.prepare_images import IMAGE_TEXT_FORMAT

SPLITS = ("train", "valid", "test")
# Splits are cut within every block of this many documents (per shard), so valid and test
# documents come from all over the corpus rather than from its end, in few contiguous ranges.
SPLIT_BLOCK_DOCUMENTS = 1000


def split_blocks(n_documents: int, fractions: list[float], split: str) -> list[tuple[int, int]]:
    """The split's share of n_documents as [lo, hi) document ranges: within each block of SPLIT_BLOCK_DOCUMENTS
    documents the first share goes to train, the next to valid, the rest to test (shares rounded per block)."""
    which = SPLITS.index(split)
    cumulative = np.concatenate([[0.0], np.cumsum(fractions, dtype=np.float64)]) / float(sum(fractions))
    ranges = []
    for block in range(0, n_documents, SPLIT_BLOCK_DOCUMENTS):
        size = min(SPLIT_BLOCK_DOCUMENTS, n_documents - block)
        lo = block + int(round(size * cumulative[which]))
        hi = block + int(round(size * cumulative[which + 1]))
        if hi > lo:
            ranges.append((lo, hi))
    return ranges


def read_manifest(path: str | Path, format_name: str = FORMAT, format_version: int = FORMAT_VERSION) -> dict:
    """The manifest of a prepared dataset directory of the given kind (text by default), or a DataError saying
    how to make one."""
    path = Path(path).expanduser()
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise DataError(f"prepared dataset {path} does not exist: run `shardwright prepare INPUTS --tokenizer "
                        f"TOKENIZER --output {path}` first")
    try:
        manifest = json.loads(manifest_path.read_text())
    except OSError:
        raise DataError(f"{path} is not a prepared dataset (no {MANIFEST}): run `shardwright prepare ... "
                        f"--output {path}`") from None
    except ValueError as e:
        raise DataError(f"{manifest_path} is not valid JSON ({e}): prepare {path} again with --force") from None
    kinds = {FORMAT: "text", IMAGE_TEXT_FORMAT: "image-text"}
    found = manifest.get("format")
    if found != format_name and found in kinds:
        raise DataError(f"{path} is a prepared {kinds[found]} dataset, but a {kinds[format_name]} one is needed "
                        "here: point at the other kind, or prepare these inputs accordingly")
    if found != format_name or manifest.get("format_version") != format_version:
        raise DataError(f"{manifest_path} is not a {format_name} v{format_version} manifest: prepare {path} again "
                        "with --force")
    return manifest


class PreparedDataset:
    """The shards of a prepared dataset, each checked against the manifest: present, whole
    (.idx and .bin agree), and holding the documents and tokens the manifest says."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.manifest = read_manifest(self.path)
        self.dataset_id = self.manifest["dataset_id"]
        self.tokenizer_fingerprint = self.manifest["tokenizer_fingerprint"]
        self.vocab_size = self.manifest["vocab_size"]
        self.shards = []
        fix = f"prepare {self.path} again with --force"
        for shard in self.manifest["shards"]:
            prefix = self.path / shard["name"]
            dataset = open_indexed(prefix, self.vocab_size)
            documents = len(dataset.document_indices) - 1
            tokens = int(dataset.sequence_lengths.sum(dtype=np.int64))
            if (documents, tokens) != (shard["documents"], shard["tokens"]):
                raise DataError(f"{prefix}.idx holds {documents} documents / {tokens} tokens but "
                                f"{self.path / MANIFEST} says {shard['documents']} / {shard['tokens']}: the shard "
                                f"is from another run; {fix}")
            if dataset.index.dtype != np.dtype(self.manifest["dtype"]):
                raise DataError(f"{prefix}.idx holds {np.dtype(dataset.index.dtype).name} tokens but the manifest "
                                f"says {self.manifest['dtype']}: {fix}")
            self.shards.append(dataset)

    def split_ranges(self, fractions: list[float], split: str) -> list[tuple[int, int, int]]:
        """The split's documents as (shard, first sequence, end sequence) ranges, in corpus
        order. Within each block of SPLIT_BLOCK_DOCUMENTS documents the first share goes to
        train, the next to valid, the rest to test (shares rounded per block)."""
        ranges = []
        for s, dataset in enumerate(self.shards):
            doc_to_seq = dataset.document_indices
            for lo, hi in split_blocks(len(doc_to_seq) - 1, fractions, split):
                first, end = int(doc_to_seq[lo]), int(doc_to_seq[hi])
                if ranges and ranges[-1][0] == s and ranges[-1][2] == first:
                    ranges[-1] = (s, ranges[-1][1], end)  # adjacent (e.g. no valid/test): merge
                else:
                    ranges.append((s, first, end))
        return ranges
