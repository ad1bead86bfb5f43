"""How the tokens of a sequence are spread over context-parallel ranks, and back.

A cp group of size R x U runs a ring over R ranks, each of which is a Ulysses group of U ranks
(ring only: U = 1; Ulysses only: R = 1). cp rank c is ring rank c // U and Ulysses rank c % U,
the order of a ("cp_ring", "cp_ulysses") mesh flattened. The sequence is split over the ring
ranks by the layout kind, then each ring rank's part contiguously over its Ulysses ranks, so an
all-to-all inside a Ulysses group reassembles exactly its ring rank's part, in order:

- zigzag: 2R chunks; ring rank r holds chunks r and 2R-1-r, concatenated. Under a causal mask
  every ring rank then does the same work (an early and a late chunk).
- contiguous: R chunks; ring rank r holds chunk r. Causal work grows with r.

With R = 1 both kinds are the natural order. Position ids must be the global ones
(`global_positions`), so RoPE sees where each token really is.
"""
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

LAYOUT_KINDS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class SequenceLayout:
    kind: str
    ring_size: int
    ulysses_size: int = 1

    def __post_init__(self):
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"unknown context-parallel layout {self.kind!r}; valid layouts: {', '.join(LAYOUT_KINDS)}")

    @property
    def cp_size(self) -> int:
        return self.ring_size * self.ulysses_size

    @property
    def chunks_per_ring_rank(self) -> int:
        return 2 if self.kind == "zigzag" else 1

    @property
    def length_multiple(self) -> int:
        """What every sequence length must be a multiple of to split evenly in this layout."""
        return self.chunks_per_ring_rank * self.cp_size

    def check(self, seq_len: int) -> None:
        """Raise ValueError unless a sequence of seq_len tokens splits evenly in this layout."""
        multiple = self.length_multiple
        if seq_len % multiple:
            factor = "2 x cp" if self.kind == "zigzag" else "cp"
            raise ValueError(f"sequence length {seq_len} is not divisible by {factor} = {multiple} "
                             f"({self.kind} layout over cp={self.cp_size}); use a multiple of {multiple}")

    def global_positions(self, seq_len: int, cp_rank: int) -> Tensor:
        """The global positions (int64) of the tokens cp rank holds, in its local order."""
        self.check(seq_len)
        ring_rank, ulysses_rank = divmod(cp_rank, self.ulysses_size)
        chunks = torch.arange(seq_len).view(self.chunks_per_ring_rank * self.ring_size, -1)
        if self.kind == "zigzag":
            ring_part = torch.cat([chunks[ring_rank], chunks[2 * self.ring_size - 1 - ring_rank]])
        else:
            ring_part = chunks[ring_rank]
        return ring_part.view(self.ulysses_size, -1)[ulysses_rank]

    def shard(self, x: Tensor, cp_rank: int, dim: int = 1) -> Tensor:
        """cp rank's part of the full sequence x (sequence along dim)."""
        return x.index_select(dim, self.global_positions(x.shape[dim], cp_rank).to(x.device))

    def unshard(self, shards: Sequence[Tensor], dim: int = 1) -> Tensor:
        """The full sequence from every cp rank's part, listed in cp-rank order."""
        if len(shards) != self.cp_size:
            raise ValueError(f"unshard needs one part per cp rank ({self.cp_size}), got {len(shards)}")
        seq_len = sum(s.shape[dim] for s in shards)
        order = torch.cat([self.global_positions(seq_len, rank) for rank in range(self.cp_size)])
        return torch.cat(list(shards), dim).index_select(dim, torch.argsort(order).to(shards[0].device))


def sequence_layout(mode: str, kind: str, cp: int, cp_ulysses: int) -> SequenceLayout:
    """How a cp group of `cp` ranks in `mode` (ring | ulysses | hybrid with cp_ulysses ranks per
    Ulysses group) spreads each sequence, with the layout `kind` over its ring."""
    ulysses = {"ring": 1, "ulysses": cp, "hybrid": cp_ulysses}[mode]
    return SequenceLayout(kind, cp // ulysses, ulysses)
