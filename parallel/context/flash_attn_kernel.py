"""The GPU block kernel over flash-attn's log-sum-exp returning functions.

UNTESTED: flash-attn is not installed where this was written and no test runs it; it follows the
published signatures. `kernel_choice.get_kernel` selects it only for CUDA tensors and raises when flash-attn is
missing. The shim covers the two signatures in the wild, found by parameter name:
  >= 2.7: _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
          window_size_right, softcap, alibi_slopes, return_softmax) -> (out, lse, S_dmask, rng_state)
  <= 2.6: the same with window_size=(left, right) (softcap from 2.6), returning 8 values with the
          lse sixth. The backward takes the same window/softcap arguments and writes into dq, dk, dv.
Layout is [B, T, H, D] (as everywhere here); lse is fp32 [B, H, T]; fp16/bf16 inputs only.
"""
import importlib.util
import inspect

import torch

from parallel.context.kernels import check_causal_block


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _supported_arguments(function, arguments: dict) -> dict:
    """`arguments` with the no-window setting spelled the way this flash-attn version spells it,
    restricted to the parameters `function` has (older versions lack softcap)."""
    parameters = inspect.signature(function).parameters
    if "window_size" in parameters:
        arguments["window_size"] = (-1, -1)
    else:
        arguments.update(window_size_left=-1, window_size_right=-1)
    return {name: value for name, value in arguments.items() if name in parameters}


class FlashAttnKernel:
    name = "flash_attn"

    def fwd(self, q, k, v, causal, scale):
        from flash_attn.flash_attn_interface import _flash_attn_forward

        check_causal_block(q, k, causal)
        outputs = _flash_attn_forward(**_supported_arguments(_flash_attn_forward, dict(
            q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=causal, softcap=0.0, alibi_slopes=None,
            return_softmax=False)))
        out, lse = (outputs[0], outputs[5]) if len(outputs) == 8 else (outputs[0], outputs[1])
        return out, lse

    def bwd(self, dout, q, k, v, out, lse, causal, scale):
        from flash_attn.flash_attn_interface import _flash_attn_backward

        check_causal_block(q, k, causal)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(**_supported_arguments(_flash_attn_backward, dict(
            dout=dout.contiguous(), q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), out=out.contiguous(),
            softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
            softcap=0.0, alibi_slopes=None, deterministic=True, rng_state=None)))
        return dq, dk, dv
