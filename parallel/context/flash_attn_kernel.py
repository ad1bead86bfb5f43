"""The GPU block kernel over flash-attn's log-sum-exp returning functions.

UNTESTED: flash-attn is not installed where this was written and no test runs it; it follows the
published signatures. `kernel_choice.get_kernel` selects it only for CUDA tensors and raises when flash-attn's
kernels do not import (not installed, or its compiled extension broken). The shim covers the two signatures in
the wild, found by parameter name (from 2.7 the functions are torch custom ops: their own signature is
(*args, **kwargs), the wrapped function's is the one read):
  >= 2.7: _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
          window_size_right, softcap, alibi_slopes, return_softmax) -> (out, lse, S_dmask, rng_state)
  <= 2.6: the same with window_size=(left, right) (softcap from 2.6), returning 8 values with the
          lse sixth. The backward takes the same window/softcap arguments and writes into dq, dk, dv.
Layout is [B, T, H, D] (as everywhere here); lse is fp32 [B, H, T]; fp16/bf16 inputs only.

Packed documents (UNTESTED as well) go through the varlen functions `_flash_attn_varlen_forward` /
`_backward`: the block's shared document segments (documents.py) are packed into [total, H, D]
with cu_seqlens, one kernel call per block. Their lse is [H, total_q] (flash-attn >= 2.5; older
versions padded it to [B, H, max_seqlen], which is refused rather than misread).
"""
import functools
import importlib
import inspect

import torch

from parallel.context.documents import shared_document_segments
from parallel.context.kernels import check_causal_block


@functools.cache
def flash_attn_import_error() -> str | None:
    """Why flash-attn's kernels cannot be used here (None when they can): its interface module imports the
    compiled extension (flash_attn_2_cuda), which fails when flash-attn is missing or was built for another
    torch or CUDA."""
    try:
        importlib.import_module("flash_attn.flash_attn_interface")
    except Exception as e:  # ImportError, or OSError / RuntimeError from loading the extension
        return f"{type(e).__name__}: {e}"
    return None


def flash_attn_available() -> bool:
    return flash_attn_import_error() is None


def _supported_arguments(function, arguments: dict) -> dict:
    """`arguments` with the no-window setting spelled the way this flash-attn version spells it,
    restricted to the parameters `function` has (older versions lack softcap)."""
    # A custom op's own signature is (*args, **kwargs): the parameters are its wrapped function's.
    signed = function._init_fn if isinstance(function, torch.library.CustomOpDef) else function
    parameters = inspect.signature(signed).parameters
    if "window_size" in parameters:
        arguments["window_size"] = (-1, -1)
    else:
        arguments.update(window_size_left=-1, window_size_right=-1)
    return {name: value for name, value in arguments.items() if name in parameters}


class _PackedSegments:
    """The shared document segments of a block as flash-attn's varlen inputs: token indices into the
    block's flattened queries and keys, cu_seqlens (int32) and the longest segment of each side."""

    def __init__(self, q_documents, k_documents, device):
        segments = shared_document_segments(q_documents, k_documents)
        if not segments:
            raise ValueError("a block without a shared document reached the flash_attn kernel; the caller skips "
                             "such blocks")
        q_lengths = [q1 - q0 for q0, q1, _, _ in segments]
        k_lengths = [k1 - k0 for _, _, k0, k1 in segments]
        self.q_index = torch.cat([torch.arange(q0, q1) for q0, q1, _, _ in segments]).to(device)
        self.k_index = torch.cat([torch.arange(k0, k1) for _, _, k0, k1 in segments]).to(device)
        self.cu_seqlens_q, self.cu_seqlens_k = (
            torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
            for lengths in (q_lengths, k_lengths))
        self.max_seqlen_q, self.max_seqlen_k = max(q_lengths), max(k_lengths)

    def varlen_arguments(self) -> dict:
        return dict(cu_seqlens_q=self.cu_seqlens_q, cu_seqlens_k=self.cu_seqlens_k, max_seqlen_q=self.max_seqlen_q,
                    max_seqlen_k=self.max_seqlen_k)


class FlashAttnKernel:
    name = "flash_attn"

    def fwd(self, q, k, v, causal, scale, q_documents=None, k_documents=None):
        from flash_attn.flash_attn_interface import _flash_attn_forward

        check_causal_block(q, k, causal)
        if q_documents is not None:
            return self._varlen_fwd(q, k, v, causal, scale, _PackedSegments(q_documents, k_documents, q.device))
        outputs = _flash_attn_forward(**_supported_arguments(_flash_attn_forward, dict(
            q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=causal, softcap=0.0, alibi_slopes=None,
            return_softmax=False)))
        out, lse = (outputs[0], outputs[5]) if len(outputs) == 8 else (outputs[0], outputs[1])
        return out, lse

    def bwd(self, dout, q, k, v, out, lse, causal, scale, q_documents=None, k_documents=None):
        from flash_attn.flash_attn_interface import _flash_attn_backward

        check_causal_block(q, k, causal)
        if q_documents is not None:
            return self._varlen_bwd(dout, q, k, v, out, lse, causal, scale,
                                    _PackedSegments(q_documents, k_documents, q.device))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(**_supported_arguments(_flash_attn_backward, dict(
            dout=dout.contiguous(), q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), out=out.contiguous(),
            softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
            softcap=0.0, alibi_slopes=None, deterministic=True, rng_state=None)))
        return dq, dk, dv

    @staticmethod
    def _varlen_fwd(q, k, v, causal, scale, packed: _PackedSegments):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

        b, tq, hq, d = q.shape
        q_packed = q.flatten(0, 1).index_select(0, packed.q_index)
        k_packed, v_packed = (t.flatten(0, 1).index_select(0, packed.k_index) for t in (k, v))
        outputs = _flash_attn_varlen_forward(**_supported_arguments(_flash_attn_varlen_forward, dict(
            q=q_packed, k=k_packed, v=v_packed, **packed.varlen_arguments(), dropout_p=0.0, softmax_scale=scale,
            causal=causal, softcap=0.0, alibi_slopes=None, return_softmax=False)))
        out_packed, lse_packed = (outputs[0], outputs[5]) if len(outputs) == 8 else (outputs[0], outputs[1])
        if lse_packed.shape != (hq, q_packed.shape[0]):
            raise ValueError(f"flash-attn's varlen lse has shape {tuple(lse_packed.shape)}, expected [heads, "
                             f"tokens] = {(hq, q_packed.shape[0])}; this flash-attn version is not supported, "
                             "use flash-attn >= 2.5")
        # Queries without a key of their document in this block: out 0, lse -inf (see kernels.py).
        out = q.new_zeros(b * tq, hq, d).index_copy_(0, packed.q_index, out_packed)
        lse = torch.full((b * tq, hq), float("-inf"), dtype=torch.float32, device=q.device)
        lse.index_copy_(0, packed.q_index, lse_packed.T.float())
        return out.view(b, tq, hq, d), lse.view(b, tq, hq).transpose(1, 2).contiguous()

    @staticmethod
    def _varlen_bwd(dout, q, k, v, out, lse, causal, scale, packed: _PackedSegments):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

        dout_p, q_p, out_p = (t.flatten(0, 1).index_select(0, packed.q_index) for t in (dout, q, out))
        k_p, v_p = (t.flatten(0, 1).index_select(0, packed.k_index) for t in (k, v))
        lse_p = lse.transpose(1, 2).flatten(0, 1).index_select(0, packed.q_index).T.contiguous()  # [Hq, total_q]
        dq_p, dk_p, dv_p = torch.empty_like(q_p), torch.empty_like(k_p), torch.empty_like(v_p)
        _flash_attn_varlen_backward(**_supported_arguments(_flash_attn_varlen_backward, dict(
            dout=dout_p, q=q_p, k=k_p, v=v_p, out=out_p, softmax_lse=lse_p, dq=dq_p, dk=dk_p, dv=dv_p,
            **packed.varlen_arguments(), dropout_p=0.0, softmax_scale=scale, causal=causal, softcap=0.0,
            alibi_slopes=None, deterministic=True, rng_state=None)))
        dq = q.new_zeros(q.flatten(0, 1).shape).index_copy_(0, packed.q_index, dq_p).view(q.shape)
        dk = k.new_zeros(k.flatten(0, 1).shape).index_copy_(0, packed.k_index, dk_p).view(k.shape)
        dv = v.new_zeros(v.flatten(0, 1).shape).index_copy_(0, packed.k_index, dv_p).view(v.shape)
        return dq, dk, dv
