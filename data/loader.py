"""Fixed-length samples over a token stream, and the deterministic global batch of each step."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.errors import DataError
from data.indexed import open_indexed


class PackedTokens:
    """The concatenated tokens of all documents (each already ends in EOS), cut into samples
    of seq_len + 1 tokens. Sample i is stream[i*seq_len : i*seq_len + seq_len + 1]: consecutive
    samples share one token, so every stream token but the first is a target exactly once."""

    def __init__(self, dataset, seq_len: int):
        if isinstance(dataset, (str, Path)):
            dataset = open_indexed(Path(dataset), vocab_size=None)
        self.dataset = dataset
        self.seq_len = seq_len
        # Stream offset where each megatron sequence starts, plus the end of the stream.
        self._starts = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
        self.num_tokens = int(self._starts[-1])
        self.num_samples = (self.num_tokens - 1) // seq_len
        # Stream offset where each document starts (a megatron document spans >= 1 sequences).
        self._document_starts = self._starts[np.asarray(dataset.document_indices[:-1], dtype=np.int64)]
        if self.num_samples < 1:
            raise DataError(
                f"{dataset.path_prefix}.bin has {self.num_tokens} tokens, but seq_len {seq_len} "
                f"needs at least {seq_len + 1} for one sample: lower train.seq_len or use more data"
            )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        pos = i * self.seq_len
        end = pos + self.seq_len + 1
        seq = int(np.searchsorted(self._starts, pos, side="right")) - 1
        pieces = []
        while pos < end:
            length = min(end, int(self._starts[seq + 1])) - pos
            pieces.append(self.dataset.get(seq, offset=pos - int(self._starts[seq]), length=length))
            pos += length
            seq += 1
        return torch.from_numpy(np.concatenate(pieces).astype(np.int64))

    def document_starts(self, i: int) -> np.ndarray:
        """Offsets within sample i (1..seq_len) at which a new document begins."""
        pos = i * self.seq_len
        lo, hi = np.searchsorted(self._document_starts, [pos + 1, pos + self.seq_len + 1])
        return self._document_starts[lo:hi] - pos


@dataclass
class DocumentInfo:
    """Where documents begin inside the input rows of a micro-batch, for intra-document
    attention masks and per-document positions (RoPE). Both are [micro_batch_size, seq_len]."""

    positions: torch.Tensor  # token's position within its document, 0 at each document start
    document_ids: torch.Tensor  # 0, 1, 2, ... for the documents of a row, in order


def document_info(starts: list[np.ndarray], seq_len: int) -> DocumentInfo:
    """DocumentInfo of rows whose documents begin at the given sample offsets (the first
    token of a row always starts its first, possibly partial, document at position 0)."""
    marks = np.zeros((len(starts), seq_len), dtype=np.int64)
    for row, offsets in enumerate(starts):
        marks[row, offsets[(offsets > 0) & (offsets < seq_len)]] = 1
    index = np.broadcast_to(np.arange(seq_len), marks.shape)
    segment_start = np.maximum.accumulate(np.where(marks == 1, index, 0), axis=1)
    return DocumentInfo(positions=torch.from_numpy(index - segment_start),
                        document_ids=torch.from_numpy(np.cumsum(marks, axis=1)))


class GlobalBatchLoader:
    """Serves this dp rank's share of each step's global batch.

    Global sample position g = step * global_batch_size + j is sample perm_e[g % S] of epoch
    e = g // S, with perm_e drawn from (seed, e). The global batch thus depends only on seed
    and step, never on the dp size or micro-batch size, and a resumed run sees the same samples.
    """

    def __init__(
        self,
        samples: PackedTokens,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        documents: bool = False,
    ):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
        rows_per_micro_step = micro_batch_size * dp_size
        if min(global_batch_size, micro_batch_size) < 1 or global_batch_size % rows_per_micro_step:
            raise DataError(
                f"global_batch_size {global_batch_size} is not a positive multiple of "
                f"micro_batch_size {micro_batch_size} x dp size {dp_size}: change "
                "train.global_batch_size or train.micro_batch_size"
            )
        self.samples = samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.documents = documents  # serve document structure (data.document_mask)
        self.step = 0  # the next step next() serves
        self._epoch = -1
        self._permutation = None

    def micro_batches(self, step: int, documents: bool | None = None) -> list[dict[str, torch.Tensor]]:
        """This rank's rows of step's global batch, as micro-batches of micro_batch_size rows: dicts of
        `tokens`, `targets` (tokens shifted by one) and `positions` (0 .. seq_len - 1), each
        [micro_batch_size, seq_len]. With documents (default: the loader's `documents`) `positions`
        restart at 0 at every document and `document_ids` numbers the documents of each row (see
        DocumentInfo), so attention can stay inside each document."""
        documents = self.documents if documents is None else documents
        located = self.rank_samples(step)
        rows = torch.stack([samples[i] for samples, i in located])
        positions = torch.arange(rows.shape[1] - 1).repeat(self.micro_batch_size, 1)
        batches = [{"tokens": mb[:, :-1].contiguous(), "targets": mb[:, 1:].contiguous(), "positions": positions}
                   for mb in rows.split(self.micro_batch_size)]
        if documents:
            mbs = self.micro_batch_size
            starts = [samples.document_starts(i) for samples, i in located]
            for k, batch in enumerate(batches):
                info = document_info(starts[k * mbs:(k + 1) * mbs], batch["tokens"].shape[1])
                batch.update(document_ids=info.document_ids, positions=info.positions)
        return batches

    def rank_samples(self, step: int) -> list[tuple]:
        """(samples, index) of each of this rank's rows of step's global batch, in order."""
        rows_per_rank = self.global_batch_size // self.dp_size
        first = step * self.global_batch_size + self.dp_rank * rows_per_rank
        return self._locate(np.arange(first, first + rows_per_rank, dtype=np.int64))

    def distinct_samples(self, limit: int) -> int:
        """How many of the first `limit` global positions (the rows of steps 0, 1, ... in order) hold a sample no
        earlier position holds: an evaluation over them reads no sample twice. The first epoch visits every sample
        once."""
        return min(limit, self.samples.num_samples)

    def next(self) -> list[dict[str, torch.Tensor]]:
        batches = self.micro_batches(self.step)
        self.step += 1
        return batches

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"the checkpoint's data loader used {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}, so the resumed run would not see the same "
                    f"samples: set train.{key}={state[key]} or start a new run dir"
                )
        self.step = state["step"]

    def _locate(self, positions: np.ndarray) -> list[tuple]:
        """(samples, index) of the sample at each global position."""
        return [(self.samples, self._sample_at(int(g))) for g in positions]

    def _sample_at(self, position: int) -> int:
        epoch, index = divmod(position, self.samples.num_samples)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutation = rng.permutation(self.samples.num_samples)
            self._epoch = epoch
        return int(self._permutation[index])


class LoaderWrapper:
    """Base of a loader that serves another loader's micro-batches changed (e.g. with keys a family adds per
    row): its step counter and checkpoint state are the wrapped loader's. Subclasses define micro_batches(step)."""

    def __init__(self, loader):
        self.loader = loader

    @property
    def step(self) -> int:
        return self.loader.step

    @step.setter
    def step(self, value: int) -> None:
        self.loader.step = value

    def distinct_samples(self, limit: int) -> int:
        return self.loader.distinct_samples(limit)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
