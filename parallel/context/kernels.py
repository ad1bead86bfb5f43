"""Block attention kernels: one interface over the plain-math reference, the CPU flash kernel and
flash-attn on GPU. The ring, Ulysses and hybrid code only ever talks to this interface.

Layout (every kernel, every tensor): q, out, dout are [B, Tq, Hq, D]; k, v are [B, Tk, Hkv, D]
with Hkv dividing Hq (grouped-query: q head h reads kv head h // (Hq / Hkv)); the log-sum-exp is
[B, Hq, Tq] in `accumulation_dtype(q.dtype)` (fp32, fp64 for fp64 inputs). dk, dv have Hkv heads.

`causal` is only accepted for square blocks (Tq == Tk): the CPU kernel aligns the mask top-left
and flash-attn bottom-right when lengths differ, so the ring only ever asks for causal on a
diagonal block, where both agree.
"""
import math
from typing import Protocol

import torch
from torch import Tensor

def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partials are merged and gradients accumulated in fp32, or fp64 when the inputs are fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


class BlockKernel(Protocol):
    name: str

    def fwd(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        """(out [B, Tq, Hq, D] in q's dtype, lse [B, Hq, Tq] in the accumulation dtype)."""

    def bwd(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
            scale: float) -> tuple[Tensor, Tensor, Tensor]:
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
    def _scores(q: Tensor, k_full: Tensor, causal: bool, scale: float) -> Tensor:
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k_full) * scale
        if causal:
            future = torch.ones(q.shape[1], k_full.shape[1], dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores

    @staticmethod
    def _widen(q: Tensor, *kv: Tensor) -> list[Tensor]:
        """q and each kv tensor in the accumulation dtype, kv heads repeated up to q's head count."""
        acc = accumulation_dtype(q.dtype)
        return [q.to(acc)] + [t.repeat_interleave(q.shape[2] // t.shape[2], dim=2).to(acc) for t in kv]

    def fwd(self, q, k, v, causal, scale):
        check_causal_block(q, k, causal)
        q_acc, k_full, v_full = self._widen(q, k, v)
        scores = self._scores(q_acc, k_full, causal, scale)
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse.unsqueeze(-1)), v_full)
        return out.to(q.dtype), lse

    def bwd(self, dout, q, k, v, out, lse, causal, scale):
        check_causal_block(q, k, causal)
        q_acc, k_full, v_full = self._widen(q, k, v)
        acc = q_acc.dtype
        dout, out = dout.to(acc), out.to(acc)
        probs = torch.exp(self._scores(q_acc, k_full, causal, scale) - lse.to(acc).unsqueeze(-1))
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
    matching the accumulation dtype; grouped-query heads are handled natively.
    """
    name = "cpu_flash"

    def fwd(self, q, k, v, causal, scale):
        check_causal_block(q, k, causal)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale)
        return out.transpose(1, 2), lse

    def bwd(self, dout, q, k, v, out, lse, causal, scale):
        check_causal_block(q, k, causal)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
            lse.contiguous(), 0.0, causal, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
