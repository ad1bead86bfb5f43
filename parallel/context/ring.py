"""Ring attention: queries stay, key/value blocks travel around the cp ring.

At step s rank r holds the KV block of rank (r - s) mod N and merges that block's partial
attention into its running (out, lse). The next block's transfer (one batched isend/irecv of
k and v stacked) is posted before the current block is computed, so it overlaps the compute.

Which part of a block is computed (causal; non-causal blocks are always whole):
- contiguous layout: the own block is causal, earlier ranks' blocks are whole, later ones skipped
  (rank N-1 works N blocks, rank 0 one);
- zigzag layout (rank r holds chunks r and 2N-1-r): the own block is causal (local order is
  global order); an earlier rank's block is seen by all queries but only in its early chunk; a
  later rank's block is seen whole but only by the late query chunk. Every step is half a block.

The backward replays the ring with the global out and lse (so each block's probabilities are
final), accumulates dq locally and sends each block's dk/dv accumulator along with the block;
one extra hop brings it home. Sums run in fp32, or fp64 for fp64 inputs.

Packed documents: every rank's document ids are all-gathered once per call (int64, B x T in all,
small next to one K,V block), so each step knows the ids of the block it holds. A block part
whose queries share no document with its keys is skipped (forward and backward alike, no
compute, the block still travels); otherwise the kernel gets the part's ids (documents.py).
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.context.documents import check_document_ids, shares_a_document
from parallel.context.kernel_choice import get_kernel
from parallel.context.kernels import BlockKernel, accumulation_dtype, default_scale
from parallel.context.layout import LAYOUT_KINDS
from parallel.context.merge import merge_partials

# Distinct tags keep the kv and dkv transfers of the backward, both in flight between the same
# neighbours and possibly of equal size, from ever matching each other's receives.
KV_TAG, DKV_TAG = 1, 2


class _PendingReceive:
    def __init__(self, works: list, received: Tensor, sent: Tensor):
        self._works, self._received, self._sent = works, received, sent  # sent: alive until the send completes

    def wait(self) -> Tensor:
        for work in self._works:
            work.wait()
        return self._received


class _Ring:
    """This rank's place in the ring of `group`; None is a ring of one (no communication)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)

    def pass_on(self, tensor: Tensor, tag: int) -> _PendingReceive:
        """Send tensor to the next rank and receive the previous rank's into a new tensor."""
        received = torch.empty_like(tensor)
        next_rank = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        previous_rank = dist.get_global_rank(self.group, (self.rank - 1) % self.size)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, next_rank, self.group, tag),
                                        dist.P2POp(dist.irecv, received, previous_rank, self.group, tag)])
        return _PendingReceive(works, received, tensor)

    def gather(self, tensor: Tensor) -> Tensor:
        """Every ring rank's `tensor`, stacked in ring-rank order ([size, *tensor.shape])."""
        if self.group is None:
            return tensor.unsqueeze(0)
        gathered = tensor.new_empty((self.size * tensor.shape[0], *tensor.shape[1:]))  # gloo wants dim 0 stacked
        dist.all_gather_into_tensor(gathered, tensor.contiguous(), group=self.group)
        return gathered.view(self.size, *tensor.shape)


@dataclass(frozen=True)
class _Block:
    queries: slice  # rows of the local queries that see this kv block
    keys: slice     # rows of the kv block they see
    causal: bool


_ALL = slice(None)


def _block_at(rank: int, source: int, local_len: int, causal: bool, zigzag: bool) -> _Block | None:
    """What rank computes against the kv block of ring rank `source`; None when it sees none of it."""
    if not causal:
        return _Block(_ALL, _ALL, False)
    if source == rank:
        return _Block(_ALL, _ALL, True)
    if not zigzag:
        return _Block(_ALL, _ALL, False) if source < rank else None
    half = local_len // 2
    if source < rank:
        return _Block(_ALL, slice(0, half), False)
    return _Block(slice(half, None), _ALL, False)


@dataclass(frozen=True)
class _Documents:
    """Document ids of this rank's queries [B, T_local] and of every ring rank's keys [N, B, T_local]."""
    queries: Tensor
    keys_by_rank: Tensor

    def of_block(self, block: _Block, source: int) -> dict:
        """The kernel's document arguments for `block` of ring rank `source`'s keys."""
        return dict(q_documents=self.queries[:, block.queries], k_documents=self.keys_by_rank[source][:, block.keys])


def _visible_block_at(rank: int, source: int, local_len: int, causal: bool, zigzag: bool,
                      documents: _Documents | None) -> tuple[_Block | None, dict]:
    """_block_at, and None as well when no query of the block shares a document with its keys; with
    the kernel's document arguments of the block."""
    block = _block_at(rank, source, local_len, causal, zigzag)
    if block is None or documents is None:
        return block, {}
    block_documents = documents.of_block(block, source)
    return (block, block_documents) if shares_a_document(*block_documents.values()) else (None, {})


def _forward(q, k, v, ring: _Ring, causal: bool, zigzag: bool, kernel: BlockKernel, scale: float,
             documents: _Documents | None):
    acc = accumulation_dtype(q.dtype)
    kv = torch.stack([k, v])
    out = lse = None
    for step in range(ring.size):
        if step + 1 < ring.size:
            incoming = ring.pass_on(kv, KV_TAG)
        block, block_documents = _visible_block_at(ring.rank, (ring.rank - step) % ring.size, q.shape[1], causal,
                                                   zigzag, documents)
        if block is not None:
            rows = block.queries
            block_out, block_lse = kernel.fwd(q[:, rows], kv[0][:, block.keys], kv[1][:, block.keys],
                                              block.causal, scale, **block_documents)
            if out is None:  # step 0: the own, diagonal block covers every row (a token sees itself)
                # Copies, always: the merges below write into them in place, and selective activation
                # checkpointing may hold the kernel's own outputs for the recompute (.to of the same dtype
                # would hand back those very tensors).
                out, lse = block_out.to(acc, copy=True), block_lse.to(acc, copy=True)
            else:
                out[:, rows], lse[:, :, rows] = merge_partials(out[:, rows], lse[:, :, rows], block_out, block_lse)
        if step + 1 < ring.size:
            kv = incoming.wait()
    return out.to(q.dtype), lse


def _backward(dout, q, k, v, out, lse, ring: _Ring, causal: bool, zigzag: bool, kernel: BlockKernel, scale: float,
              documents: _Documents | None):
    acc = accumulation_dtype(q.dtype)
    kv = torch.stack([k, v])  # replayed from the saved local block, never from the forward's last one
    dq = torch.zeros_like(q, dtype=acc)
    dkv = torch.zeros_like(kv, dtype=acc)  # the accumulator of the kv block held at this step
    for step in range(ring.size):
        if step + 1 < ring.size:
            incoming_kv = ring.pass_on(kv, KV_TAG)
        block, block_documents = _visible_block_at(ring.rank, (ring.rank - step) % ring.size, q.shape[1], causal,
                                                   zigzag, documents)
        if block is not None:
            rows, keys = block.queries, block.keys
            block_dq, block_dk, block_dv = kernel.bwd(dout[:, rows], q[:, rows], kv[0][:, keys], kv[1][:, keys],
                                                      out[:, rows], lse[:, :, rows], block.causal, scale,
                                                      **block_documents)
        if step > 0:  # the block's accumulator, from the ranks that held it before
            dkv = incoming_dkv.wait()
        if block is not None:
            dq[:, rows] += block_dq
            dkv[0][:, keys] += block_dk
            dkv[1][:, keys] += block_dv
        if ring.size > 1:
            incoming_dkv = ring.pass_on(dkv, DKV_TAG)
        if step + 1 < ring.size:
            kv = incoming_kv.wait()
    if ring.size > 1:
        dkv = incoming_dkv.wait()  # after N hops: this rank's own block's gradient
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, causal, zigzag, kernel, scale, documents):
        out, lse = _forward(q, k, v, ring, causal, zigzag, kernel, scale, documents)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (ring, causal, zigzag, kernel, scale, documents)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dq, dk, dv = _backward(dout, *ctx.saved_tensors, *ctx.settings)
        return dq, dk, dv, None, None, None, None, None, None


def check_qkv_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [B, T, H, D] with "
                         "the same B, T and D, and k, v of one shape")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None, *, causal: bool = True,
                   layout: str = "zigzag", kernel: str = "auto", scale: float | None = None,
                   document_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention of this rank's queries over the whole sequence spread over `group` in `layout`.

    q [B, T_local, Hq, D], k and v [B, T_local, Hkv, D] (Hkv divides Hq) -> (out [B, T_local, Hq, D],
    lse [B, Hq, T_local] in fp32, fp64 for fp64 inputs). Differentiable in q, k, v; the lse is not.
    group None is a ring of one: plain blockwise attention through the kernel. document_ids
    [B, T_local] (this rank's tokens' documents, nondecreasing in the local order, which every
    layout keeps global) confine each query to its own document.
    """
    if layout not in LAYOUT_KINDS:
        raise ValueError(f"unknown context-parallel layout {layout!r}; valid layouts: {', '.join(LAYOUT_KINDS)}")
    check_qkv_shapes(q, k, v)
    ring = _Ring(group)
    zigzag = layout == "zigzag"
    if zigzag and ring.size > 1 and q.shape[1] % 2:
        raise ValueError(f"zigzag layout needs the sequence length ({q.shape[1] * ring.size}) divisible by "
                         f"2 x cp = {2 * ring.size}; each rank holds two equal chunks")
    scale = default_scale(q.shape[-1]) if scale is None else scale
    documents = None
    if document_ids is not None:
        check_document_ids(document_ids, q)
        documents = _Documents(document_ids, ring.gather(document_ids))
    return _RingAttention.apply(q, k, v, ring, causal, zigzag, get_kernel(kernel, q.device), scale, documents)
