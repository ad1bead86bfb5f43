"""Blends of prepared datasets: the sample at every global position, as a pure function of
(seed, position), in O(1) memory per dataset.

    global position g = step * global_batch_size + row
      -> block b = g // K of the blend schedule: block b holds exactly n_i(b) samples of dataset i
         (largest-remainder apportionment of the cumulative weights, so after any number of
         blocks every dataset's share is within one sample of its weight), in an order shuffled
         by a keyed permutation of (seed, b)
      -> dataset i, draw k (the k-th sample ever taken from dataset i)
      -> epoch e = k // S_i; sample Permutation(S_i, key=(seed, i, e))[k % S_i] of dataset i
      -> seq_len + 1 tokens of dataset i's split stream (its documents concatenated, each
         ending in EOS), with the offsets at which documents begin.

Nothing depends on the dp size, the micro-batch size or how many steps a run plans, so a run
resumed on another dp size (or extended) sees exactly the samples it would have seen. Each
epoch of a dataset visits every one of its samples once, and each epoch is shuffled anew.

Why not megatron-core's BlendedMegatronDatasetBuilder / GPTDataset (whose .bin/.idx format and
IndexedDataset reader this uses): their indices are built for a fixed total number of samples
(train_iters x global batch), so the number of epochs, the "separate final epoch" rule and the
blending index all change with the length of the run: extending a run reorders the samples of
steps already taken. They also materialize index arrays the size of the whole run (and cache
them on disk), while the permutations here are computed on the fly.
"""

import hashlib
import json
import math
from fractions import Fraction

import numpy as np
import torch

from data.errors import DataError
from data.loader import GlobalBatchLoader

_MASK64 = (1 << 64) - 1
_ROUNDS = 6
MIN_BLOCK = 1024  # the blend schedule's block size (raised so the rarest dataset gets >= 1 per block)
_BLEND_KEY = 0x626C656E64  # "blend": separates the schedule's permutations from the datasets'


def _mix_int(x: int) -> int:
    """splitmix64 finalizer on a Python int (for keys)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A pseudo-random permutation of range(n) chosen by `key` (a tuple of ints), evaluated
    pointwise without storing it: a balanced Feistel network on the smallest even number of
    bits covering n, with cycle walking for values >= n. O(1) memory, platform independent."""

    def __init__(self, n: int, key: tuple[int, ...]):
        self.n = int(n)
        half = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self._half = np.uint64(half)
        self._mask = np.uint64((1 << half) - 1)
        h = 0
        for part in key:
            h = _mix_int(h ^ (int(part) & _MASK64))
        self._round_keys = [np.uint64(_mix_int(h + r)) for r in range(_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self._round_keys:
            left, right = right, left ^ (_mix(right ^ key) & self._mask)
        return (left << self._half) | right

    def __call__(self, index) -> np.ndarray:
        x = np.asarray(index, dtype=np.uint64).copy()
        if self.n <= 1:
            return x.astype(np.int64)
        y = self._encrypt(x)
        outside = y >= np.uint64(self.n)
        while outside.any():  # cycle walking: the cycle through x < n returns below n
            y[outside] = self._encrypt(y[outside])
            outside = y >= np.uint64(self.n)
        return y.astype(np.int64)


class PackedRanges:
    """Like loader.PackedTokens, over the documents of a split: contiguous (shard, first
    sequence, end sequence) ranges of megatron datasets, concatenated into one token stream
    and cut into samples of seq_len + 1 tokens (consecutive samples share one token)."""

    def __init__(self, shards: list, ranges: list[tuple[int, int, int]], seq_len: int, name: str):
        self.shards, self.seq_len, self.name = shards, seq_len, name
        self._shard = np.array([r[0] for r in ranges], dtype=np.int64)
        self._first = np.array([r[1] for r in ranges], dtype=np.int64)
        self._end = np.array([r[2] for r in ranges], dtype=np.int64)
        tokens = [int(shards[s].sequence_lengths[a:b].sum(dtype=np.int64)) for s, a, b in ranges]
        self._range_start = np.concatenate([[0], np.cumsum(tokens, dtype=np.int64)])
        self.num_tokens = int(self._range_start[-1])
        self.num_samples = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_samples < 1:
            raise DataError(f"{name} has {self.num_tokens} tokens, but seq_len {seq_len} needs at least {seq_len + 1} "
                            "for one sample: lower train.seq_len, use more data, or give this split a larger share "
                            "in data.splits")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._read(i)[0]

    def document_starts(self, i: int) -> np.ndarray:
        """Offsets within sample i (1..seq_len) at which a new document begins."""
        return self._read(i)[1]

    def _read(self, i: int) -> tuple[torch.Tensor, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        pos = i * self.seq_len
        end = pos + self.seq_len + 1
        r = int(np.searchsorted(self._range_start, pos, side="right")) - 1
        seq, offset = self._sequence_at(r, pos)
        pieces, starts = [], []
        while pos < end:
            shard = self.shards[self._shard[r]]
            if offset == 0 and self._is_document_start(shard, seq):
                starts.append(pos - i * self.seq_len)
            length = min(end - pos, int(shard.sequence_lengths[seq]) - offset)
            if length > 0:
                pieces.append(shard.get(seq, offset=offset, length=length))
            pos += length
            seq, offset = seq + 1, 0
            if seq == self._end[r] and pos < end:
                r += 1
                seq = int(self._first[r])
        tokens = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        starts = np.asarray(starts, dtype=np.int64)
        return tokens, starts[starts > 0]

    def _sequence_at(self, r: int, pos: int) -> tuple[int, int]:
        """The sequence of range r holding stream position pos, and pos's offset in it."""
        shard = self.shards[self._shard[r]]
        first, end = int(self._first[r]), int(self._end[r])
        itemsize = np.dtype(shard.index.dtype).itemsize
        pointers = shard.index.sequence_pointers
        target = int(pointers[first]) + (pos - int(self._range_start[r])) * itemsize
        seq = first + int(np.searchsorted(pointers[first:end], target, side="right")) - 1
        return seq, (target - int(pointers[seq])) // itemsize

    @staticmethod
    def _is_document_start(shard, seq: int) -> bool:
        documents = shard.document_indices
        k = int(np.searchsorted(documents, seq))
        return k < len(documents) and int(documents[k]) == seq


class BlendSchedule:
    """Which dataset each global position draws from, and the how-many-th draw from it that is.
    Exact: the cumulative counts use rational arithmetic on the weights."""

    def __init__(self, weights: list[float], seed: int):
        fractions = [Fraction(w) for w in weights]
        if not fractions or any(f <= 0 for f in fractions):
            raise DataError(f"blend weights must be positive, got {weights}")
        total = sum(fractions)
        self.weights = [f / total for f in fractions]
        self.block = max(MIN_BLOCK, math.ceil(1 / min(self.weights)))
        self.seed = seed
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _cumulative(self, b: int) -> np.ndarray:
        """Samples of each dataset in blocks 0..b-1 (largest remainder on weight * K * b)."""
        total = self.block * b
        targets = [w * total for w in self.weights]
        counts = [math.floor(t) for t in targets]
        left = total - sum(counts)
        order = sorted(range(len(targets)), key=lambda i: (counts[i] - targets[i], i))  # largest remainder first
        for i in order[:left]:
            counts[i] += 1
        return np.array(counts, dtype=np.int64)

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self._cache:
            before, after = self._cumulative(b), self._cumulative(b + 1)
            counts = after - before  # >= 0 because weight * block >= 1
            labels = np.repeat(np.arange(len(counts)), counts)
            labels = labels[Permutation(self.block, (self.seed, _BLEND_KEY, b))(np.arange(self.block))]
            order = np.argsort(labels, kind="stable")
            rank = np.empty(self.block, dtype=np.int64)
            rank[order] = np.arange(self.block) - np.repeat(np.cumsum(counts) - counts, counts)
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[b] = (labels, before[labels] + rank)
        return self._cache[b]

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, draw) for each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        datasets = np.empty_like(positions)
        draws = np.empty_like(positions)
        blocks = positions // self.block
        for b in np.unique(blocks):
            where = blocks == b
            labels, draw = self._block(int(b))
            within = positions[where] - b * self.block
            datasets[where], draws[where] = labels[within], draw[within]
        return datasets, draws


class BlendedSamples:
    """The samples of a blend of PackedRanges, by global position."""

    def __init__(self, components: list[PackedRanges], weights: list[float], seed: int, fingerprint: str):
        self.components = components
        self.seq_len = components[0].seq_len
        self.schedule = BlendSchedule(weights, seed)
        self.seed = seed
        self.fingerprint = fingerprint
        self.num_samples = sum(c.num_samples for c in components)

    def locate(self, positions: np.ndarray) -> list[tuple[PackedRanges, int]]:
        datasets, draws = self.schedule.lookup(positions)
        sizes = np.array([c.num_samples for c in self.components], dtype=np.int64)[datasets]
        epochs, within = np.divmod(draws, sizes)
        samples = np.empty_like(draws)
        for d, epoch in {(int(d), int(e)) for d, e in zip(datasets, epochs)}:
            where = (datasets == d) & (epochs == epoch)
            samples[where] = Permutation(self.components[d].num_samples, (self.seed, d, epoch))(within[where])
        return [(self.components[d], int(i)) for d, i in zip(datasets.tolist(), samples.tolist())]

    def distinct_prefix(self, limit: int) -> int:
        """How many of the first `limit` global positions draw samples no earlier position draws: up to the first
        draw past a dataset's first epoch (a dataset's draws come in the order of the positions)."""
        positions = np.arange(min(limit, self.num_samples), dtype=np.int64)
        datasets, draws = self.schedule.lookup(positions)
        repeats = np.flatnonzero(draws >= np.array([c.num_samples for c in self.components], dtype=np.int64)[datasets])
        return int(repeats[0]) if len(repeats) else len(positions)

    def dataset_of(self, positions: np.ndarray) -> np.ndarray:
        """Which component each global position draws from (for tests and statistics)."""
        return self.schedule.lookup(positions)[0]


class BlendedLoader(GlobalBatchLoader):
    """GlobalBatchLoader over a blend: same interface (micro_batches(step), .step, state_dict),
    and a state that also names the data, so a resume onto other data is refused."""

    def _locate(self, positions: np.ndarray) -> list[tuple]:
        return self.samples.locate(positions)

    def distinct_samples(self, limit: int) -> int:
        return self.samples.distinct_prefix(limit)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "data": self.samples.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("data") != self.samples.fingerprint:
            raise DataError(
                f"the checkpoint's data loader read other data (fingerprint {state.get('data')}, this run's is "
                f"{self.samples.fingerprint}): the datasets, weights, splits or seq_len changed, so the resumed run "
                "would not see the same samples; restore the data section and train.seq_len, or start a new run dir")
        super().load_state_dict(state)


def blend_fingerprint(dataset_ids: list[str], weights: list[float], fractions: list[float], split: str,
                      seq_len: int) -> str:
    """Identifies the sample sequence a blend serves (independent of where the files live)."""
    text = json.dumps({"datasets": dataset_ids, "weights": [float(w) for w in weights],
                       "splits": [float(f) for f in fractions], "split": split, "seq_len": seq_len})
    return hashlib.sha256(text.encode()).hexdigest()[:16]
