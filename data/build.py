"""From the config's `data` section to a tokenizer and the train / valid loaders.

Two kinds of data:
- the embedded corpus (`data.source`, the default): built and cached by data.embedded;
- prepared datasets (`data.prepared`: directories written by `shardwright prepare`, each with a
  weight), blended, split into train / valid / test by `data.splits`.

`data_cfg` is any object with the DataSection attributes (launcher.config.DataSection).
"""

import math
from dataclasses import dataclass
from pathlib import Path

from data.blend import BlendedLoader, BlendedSamples, PackedRanges, blend_fingerprint
from data.embedded import prepare_embedded
from data.errors import DataError
from data.indexed import open_indexed
from data.loader import GlobalBatchLoader, PackedTokens
from data.prepared import FORMAT, SPLITS, PreparedDataset, read_manifest
from data.tokenizer import Tokenizer

# The smallest share of a blend a dataset may have: the blend's blocks hold 1/share samples (data/blend.py).
MIN_BLEND_SHARE = 1e-6


@dataclass
class BlendEntry:
    path: Path
    weight: float


def blend_entries(prepared: list) -> list[BlendEntry]:
    """`data.prepared` as (path, weight) entries: each item is a path, or {path: ..., weight: ...}
    (weight defaults to 1; weights are relative)."""
    if not isinstance(prepared, list):
        raise DataError(f"data.prepared should be a list of dataset directories or {{path, weight}} mappings, "
                        f"got {prepared!r}")
    entries = []
    for i, item in enumerate(prepared):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or set(item) - {"path", "weight"}:
            raise DataError(f"data.prepared[{i}] = {item!r} should be a path or a mapping with keys path and "
                            "(optionally) weight")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise DataError(f"data.prepared[{i}].weight = {weight!r} should be a positive, finite number")
        entries.append(BlendEntry(Path(item["path"]).expanduser(), float(weight)))
    share = min(e.weight for e in entries) / sum(e.weight for e in entries)
    if share < MIN_BLEND_SHARE:
        raise DataError(f"data.prepared gives a dataset {share:.1e} of the blend, below {MIN_BLEND_SHARE:g} (the blend is "
                        f"laid out in blocks holding each dataset at least once: 1/share samples, in memory): raise "
                        f"its weight or leave it out")
    paths = [e.path.resolve() for e in entries]
    if len(set(paths)) != len(paths):
        raise DataError("data.prepared names the same dataset twice: give it one entry with the summed weight")
    return entries


def split_fractions(splits) -> list[float]:
    """data.splits: relative sizes of train, valid, test, e.g. [98, 2, 0]."""
    if (not isinstance(splits, list) or len(splits) != 3
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < math.inf for s in splits)
            or not splits[0] > 0):
        raise DataError(f"data.splits = {splits!r} should be three non-negative, finite numbers (train, valid, test), "
                        "train > 0, e.g. [98, 2, 0]")
    return [float(s) for s in splits]


def resolve_tokenizer(data_cfg, manifests: list[tuple[Path, dict]]) -> Tokenizer:
    """data.tokenizer (default: the copy in the first dataset), checked to be the tokenizer
    every dataset of the blend was prepared with."""
    path = Path(data_cfg.tokenizer).expanduser() if data_cfg.tokenizer else manifests[0][0] / "tokenizer.model"
    tokenizer = Tokenizer(path)
    for dataset, manifest in manifests:
        if manifest["tokenizer_fingerprint"] != tokenizer.fingerprint:
            raise DataError(
                f"tokenizer {path} (fingerprint {tokenizer.fingerprint}, vocab {tokenizer.vocab_size}) is not the one "
                f"{dataset} was prepared with (fingerprint {manifest['tokenizer_fingerprint']}, vocab "
                f"{manifest['vocab_size']}): use that tokenizer, or prepare {dataset} again with this one (--force)")
    return tokenizer


def prepared_vocab_size(data_cfg, format_name: str = FORMAT) -> int:
    """The vocabulary of the prepared data's tokenizer (for a config that leaves data.vocab_size out)."""
    entries = blend_entries(data_cfg.prepared)
    return resolve_tokenizer(data_cfg, [(e.path, read_manifest(e.path, format_name)) for e in entries[:1]]).vocab_size


def check_data_config(data_cfg, format_name: str = FORMAT) -> None:
    """The cheap checks, before any process starts: entries, splits, manifests (of the kind the model family
    reads, DataSpec.prepared_format), tokenizer, vocab."""
    if not data_cfg.prepared:
        return
    if data_cfg.source != "pydoc":
        raise DataError(f"data.source={data_cfg.source} and data.prepared are both set: the embedded corpus "
                        "(source) and prepared datasets are alternatives; drop one")
    entries = blend_entries(data_cfg.prepared)
    split_fractions(data_cfg.splits)
    tokenizer = resolve_tokenizer(data_cfg, [(e.path, read_manifest(e.path, format_name)) for e in entries])
    if tokenizer.vocab_size != data_cfg.vocab_size:
        raise DataError(f"data.vocab_size={data_cfg.vocab_size} but tokenizer {tokenizer.model_path} has "
                        f"{tokenizer.vocab_size} pieces: set data.vocab_size={tokenizer.vocab_size} (or leave it out)")


@dataclass
class Blend:
    """Prepared datasets opened for training, with their tokenizer."""

    tokenizer: Tokenizer
    entries: list[BlendEntry]
    datasets: list[PreparedDataset]
    fractions: list[float]
    seed: int

    def samples(self, split: str, seq_len: int) -> BlendedSamples:
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        components = []
        for entry, dataset in zip(self.entries, self.datasets):
            ranges = dataset.split_ranges(self.fractions, split)
            if not ranges:
                raise DataError(f"the {split} split of {dataset.path} has no documents "
                                f"({dataset.manifest['num_documents']} in all, data.splits={self.fractions}): give "
                                f"{split} a larger share in data.splits")
            components.append(PackedRanges(dataset.shards, ranges, seq_len, f"the {split} split of {dataset.path}"))
        weights = [e.weight for e in self.entries]
        fingerprint = blend_fingerprint([d.dataset_id for d in self.datasets], weights, self.fractions, split, seq_len)
        return BlendedSamples(components, weights, self.seed, fingerprint)


def open_blend(data_cfg, seed: int) -> Blend:
    check_data_config(data_cfg)
    entries = blend_entries(data_cfg.prepared)
    datasets = [PreparedDataset(e.path) for e in entries]
    tokenizer = resolve_tokenizer(data_cfg, [(d.path, d.manifest) for d in datasets])
    return Blend(tokenizer, entries, datasets, split_fractions(data_cfg.splits), seed)


def build_loaders(data_cfg, seq_len: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int, seed: int, log=print):
    """(data, train_loader, valid_loader) for this dp rank; `data.tokenizer` is the tokenizer.
    The loaders serve each step's global batch as a function of (seed, step) only."""
    if not data_cfg.prepared:
        data = prepare_embedded(data_cfg.source, data_cfg.vocab_size, Path(data_cfg.cache_dir).expanduser(),
                                data_cfg.valid_fraction, log=log)

        def loader(prefix):
            return GlobalBatchLoader(PackedTokens(open_indexed(prefix, data.tokenizer.vocab_size), seq_len),
                                     global_batch_size, micro_batch_size, dp_rank, dp_size, seed,
                                     documents=data_cfg.document_mask)
        return data, loader(data.train_prefix), loader(data.valid_prefix)

    blend = open_blend(data_cfg, seed)
    train, valid = blend.samples("train", seq_len), blend.samples("valid", seq_len)
    total = sum(e.weight for e in blend.entries)
    log(f"blend of {len(blend.entries)} prepared dataset(s), tokenizer {blend.tokenizer.model_path} (vocab "
        f"{blend.tokenizer.vocab_size}), splits {blend.fractions}:")
    for entry, t, v in zip(blend.entries, train.components, valid.components):
        log(f"  {entry.path}: weight {entry.weight / total:.3f}, train {t.num_samples} samples "
            f"({t.num_tokens} tokens), valid {v.num_samples} samples")
    return (blend,
            BlendedLoader(train, global_batch_size, micro_batch_size, dp_rank, dp_size, seed, data_cfg.document_mask),
            BlendedLoader(valid, global_batch_size, micro_batch_size, dp_rank, dp_size, seed, data_cfg.document_mask))
