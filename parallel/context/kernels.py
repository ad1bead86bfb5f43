"""Block attention kernels: one interface over the plain-math reference, the CPU flash kernel and
flash-attn on GPU. The ring, Ulysses and hybrid code only ever talks to this interface.

Layout (every kernel, every tensor): q, out, dout are [B, Tq, Hq, D]; k, v are [B, Tk, Hkv, D]
with Hkv dividing Hq (grouped-query: q head h reads kv head h // (Hq / Hkv)); the log-sum-exp is
[B, Hq, Tq] in `accumulation_dtype(q.dtype)` (fp32, fp64 for fp64 inputs). dk, dv have Hkv heads.

`causal` is only accepted for square blocks (Tq == Tk): the CPU kernel aligns the mask top-left
and flash-attn bottom-right when lengths differ, so the ring only ever asks for causal on a
diagonal block, where both agree.

Packed documents: `q_documents` [B, Tq] and `k_documents` [B, Tk] (documents.py) restrict each
query to the keys of its document. A query row with no key of its document in the block gets
out 0 and lse -inf (merge.py merges that as "nothing seen"). The caller skips blocks where no
row shares a document; the kernels never build a [T, T] mask: math builds the block's own
[Tq, Tk] one, cpu_flash and flash_attn run per document segment (varlen).
"""
import math
from typing import Protocol

import torch
from torch import Tensor

from parallel.context.documents import shared_document_segments, visible_pairs

def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partials are merged and gradients accumulated in fp32, or fp64 when the inputs are fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


class BlockKernel(Protocol):
    name: str

    def fwd(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, q_documents: Tensor | None = None,
            k_documents: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(out [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq] in the accumulation dtype)."""

    def bwd(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
            scale: float, q_documents: Tensor | None = None,
            k_documents: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) of this block in the input dtypes, given the *final* out and lse of q's rows
        (every block merged), so the block's probabilities are already globally normalized."""


def check_causal_block(q: Tensor, k: Tensor, causal: bool) -> None:
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal block attention needs a square block, got {q.shape[1]} queries and "
                         f"{k.shape[1]} keys; pass causal=False for off-diagonal blocks")


class MathKernel:
    """Plain tensor math materializing the [Tq, Tk] scores, in the accumulation dtype on any device:
    the reference kernel, exact to rounding in fp64."""
    name = "math"

    @staticmethod
    def _hidden(q: Tensor, k: Tensor, causal: bool, q_documents: Tensor | None,
                k_documents: Tensor | None) -> Tensor | None:
        """Where a query does not see a key, [B or 1, 1, Tq, Tk]; None when it sees every key."""
        if q_documents is not None:
            return ~visible_pairs(q_documents, k_documents, causal).unsqueeze(1)
        if causal:
            return torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).triu(1)[None, None]
        return None

    @staticmethod
    def _probabilities(q: Tensor, k_full: Tensor, lse: Tensor | None, hidden: Tensor | None,
                       scale: float) -> tuple[Tensor, Tensor]:
        """(probabilities [B, H, Tq, Tk], lse [B, H, Tq]); lse from the scores unless given. Hidden
        pairs get probability 0, also in rows that see nothing (lse -inf, where exp would give NaN)."""
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k_full) * scale
        if hidden is not None:
            scores = scores.masked_fill(hidden, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1) if lse is None else lse
        probs = torch.exp(scores - lse.unsqueeze(-1))
        return (probs if hidden is None else probs.masked_fill(hidden, 0.0)), lse

    @staticmethod
    def _widen(q: Tensor, *kv: Tensor) -> list[Tensor]:
        """q and each kv tensor in the accumulation dtype, kv heads repeated up to q's head count."""
        acc = accumulation_dtype(q.dtype)
        return [q.to(acc)] + [t.repeat_interleave(q.shape[2] // t.shape[2], dim=2).to(acc) for t in kv]

    def fwd(self, q, k, v, causal, scale, q_documents=None, k_documents=None):
        check_causal_block(q, k, causal)
        q_acc, k_full, v_full = self._widen(q, k, v)
        hidden = self._hidden(q, k, causal, q_documents, k_documents)
        probs, lse = self._probabilities(q_acc, k_full, None, hidden, scale)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v_full)
        return out.to(q.dtype), lse

    def bwd(self, dout, q, k, v, out, lse, causal, scale, q_documents=None, k_documents=None):
        check_causal_block(q, k, causal)
        q_acc, k_full, v_full = self._widen(q, k, v)
        acc = q_acc.dtype
        dout, out = dout.to(acc), out.to(acc)
        hidden = self._hidden(q, k, causal, q_documents, k_documents)
        probs, _ = self._probabilities(q_acc, k_full, lse.to(acc), hidden, scale)
        dv_full = torch.einsum("bhqk,bqhd->bkhd", probs, dout)
        dprobs = torch.einsum("bqhd,bkhd->bhqk", dout, v_full)
        row_dot = (dout * out).sum(-1).transpose(1, 2).unsqueeze(-1)  # softmax backward term, [B, H, Tq, 1]
        dscores = probs * (dprobs - row_dot) * scale
        dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k_full)
        dk_full = torch.einsum("bhqk,bqhd->bkhd", dscores, q_acc)
        # The gradient of repeating kv heads: sum over the q heads that share each kv head.
        b, t, _, d = dk_full.shape
        dk, dv = (g.view(b, t, k.shape[2], -1, d).sum(dim=3) for g in (dk_full, dv_full))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class CpuFlashKernel:
    """torch's fused CPU flash attention, the aten ops that return and take the log-sum-exp.

    They want [B, H, T, D]; transposed views suffice. Their lse is fp32 (fp64 for fp64 inputs),
    matching the accumulation dtype; grouped-query heads are handled natively. With documents they
    run once per shared document segment (a masked call would take the slow path, and the kernel
    gives a fully masked row lse 0 instead of -inf).
    """
    name = "cpu_flash"

    @staticmethod
    def _fwd(q, k, v, causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale)
        return out.transpose(1, 2), lse

    @staticmethod
    def _bwd(dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
            lse.contiguous(), 0.0, causal, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    def fwd(self, q, k, v, causal, scale, q_documents=None, k_documents=None):
        check_causal_block(q, k, causal)
        if q_documents is None:
            return self._fwd(q, k, v, causal, scale)
        b, tq, hq, _ = q.shape
        out = q.new_zeros(q.shape)  # contiguous, so its flattened view below writes into it
        lse_by_token = torch.full((b * tq, hq), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
        q_tokens, k_tokens, v_tokens, out_tokens = (t.flatten(0, 1) for t in (q, k, v, out))
        for q0, q1, k0, k1 in shared_document_segments(q_documents, k_documents):
            segment_out, segment_lse = self._fwd(q_tokens[None, q0:q1], k_tokens[None, k0:k1], v_tokens[None, k0:k1],
                                                 causal, scale)
            out_tokens[q0:q1], lse_by_token[q0:q1] = segment_out[0], segment_lse[0].T
        return out, lse_by_token.view(b, tq, hq).transpose(1, 2).contiguous()

    def bwd(self, dout, q, k, v, out, lse, causal, scale, q_documents=None, k_documents=None):
        check_causal_block(q, k, causal)
        if q_documents is None:
            return self._bwd(dout, q, k, v, out, lse, causal, scale)
        dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)  # contiguous: see fwd
        dout_t, q_t, k_t, v_t, out_t, dq_t, dk_t, dv_t = (t.flatten(0, 1) for t in (dout, q, k, v, out, dq, dk, dv))
        lse_by_token = lse.transpose(1, 2).flatten(0, 1)  # [B * Tq, Hq]
        for q0, q1, k0, k1 in shared_document_segments(q_documents, k_documents):
            dq_t[q0:q1], dk_t[k0:k1], dv_t[k0:k1] = (g[0] for g in self._bwd(
                dout_t[None, q0:q1], q_t[None, q0:q1], k_t[None, k0:k1], v_t[None, k0:k1], out_t[None, q0:q1],
                lse_by_token[q0:q1].T[None], causal, scale))
        return dq, dk, dv
