"""The delta rule (DeltaNet's token mixer) and its plain-linear-attention baseline as ops, each fast
path beside its naive reference.

    S_t = S_{t-1} + k_t beta_t (v_t - S_{t-1}^T k_t)^T,    o_t = S_t^T (scale * q_t)

per batch row and head, state S [Dk, Dv]. Layout everywhere: q, k [B, T, H, Dk], v [B, T, H, Dv],
beta [B, T, H], states [B, H, Dk, Dv]. The caller L2-normalizes q and k and chooses beta's range
((0, 1), or (0, 2) to allow negative eigenvalues: the ops take beta as given). scale defaults to
Dk^-1/2.

- `delta_rule(...)`             the entry point; picks a backend (below).
- `delta_rule_recurrent(...)`   token by token, the reference (recurrent.py).
- `delta_rule_chunked(...)`     chunkwise-parallel WY/UT form in PyTorch, autograd backward (chunked.py).
- `delta_rule_state_map(...)`   a stretch of tokens as the affine map S -> M S + S_ext, plus
                                `apply_state_map`, `compose_state_maps`, `fold_state_maps`: what
                                context parallelism folds in rank order (state_map.py).

Plain linear attention (linear.py), S_t = S_{t-1} + k_t v_t^T with the same output and layout: the
rule without the erase term, for comparisons (`mixer_rule: linear` in the model config).

- `linear_attention(...)`               the entry point ("auto" / "chunked" / "recurrent").
- `linear_attention_recurrent(...)`     token by token, the reference.
- `linear_attention_chunked(...)`       chunkwise (per-chunk K^T V, an exclusive cumsum for the states).
- `linear_attention_state_map(...)`     (I, K^T V): the same map interface as the delta rule's.

`apply_mixer_rule(rule, ...)` and `mixer_rule_state_map(rule, ...)` pick one of `RULES` by name
(beta is the delta rule's only: None for "linear"), so the layer and its context-parallel version
have one code path for both.

Backends of `delta_rule`: "recurrent", "chunked", "fla" (flash-linear-attention's Triton
`chunk_delta_rule`; CUDA, fp16/bf16; chunk size fixed at 64 by the kernel, `chunk_size` ignored),
and "auto": fla for CUDA fp16/bf16 inputs when the `fla` package imports, else "chunked".
The fla path is NOT exercised by this repo's CPU tests (fla is a `gpu` extra).

Packed documents: every op and state map takes `document_ids` [B, T] (integers, None: one
document) and resets the state to zero before each token whose id differs from the previous
token's; the first token continues `initial_state` (recurrent.py, chunked.py, state_map.py). The
fla backend takes no document ids here ("auto" picks the chunked op when they are given).

Dtypes: fp64 inputs are computed in fp64, all others in fp32; o comes back in v's dtype, the final
state in fp32 (fp64 for fp64 inputs) — as fla returns it.
"""
import functools
import importlib
import inspect

import torch

from models.deltanet.ops._inputs import check_inputs
from models.deltanet.ops.chunked import delta_rule_chunked
from models.deltanet.ops.linear import (linear_attention_chunked, linear_attention_recurrent,
                                        linear_attention_state_map)
from models.deltanet.ops.recurrent import delta_rule_recurrent
from models.deltanet.ops.state_map import (apply_state_map, compose_state_maps, delta_rule_state_map,
                                           fold_state_maps)

__all__ = ["BACKENDS", "LINEAR_BACKENDS", "RULES", "apply_mixer_rule", "apply_state_map", "compose_state_maps",
           "delta_rule", "delta_rule_chunked", "delta_rule_recurrent", "delta_rule_state_map", "fla_available",
           "fla_import_error", "fla_problem", "fold_state_maps", "linear_attention", "linear_attention_chunked",
           "linear_attention_recurrent", "linear_attention_state_map", "mixer_rule_state_map"]

BACKENDS = ("auto", "chunked", "recurrent", "fla")
LINEAR_BACKENDS = ("auto", "chunked", "recurrent")  # no fla path for the baseline: it is a CPU-side comparison
RULES = ("delta", "linear")
FLA_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _import_fla() -> tuple[object, str | None]:
    """(fla's `chunk_delta_rule`, None), or (None, why flash-linear-attention is not importable)."""
    try:
        return importlib.import_module("fla.ops.delta_rule").chunk_delta_rule, None
    except Exception as e:  # not installed, or installed without a working triton/CUDA
        return None, f"{type(e).__name__}: {e}"


def _fla_chunk_delta_rule():
    return _import_fla()[0]


def fla_available() -> bool:
    return _fla_chunk_delta_rule() is not None


def fla_import_error() -> str | None:
    """Why `import fla.ops.delta_rule` fails here (None when it works)."""
    return _import_fla()[1]


def fla_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fla backend cannot compute in `dtype` on `device` here, or None; the caller says what to use instead.
    The device first: off CUDA, installing fla would not help."""
    if device.type != "cuda":
        return f"flash-linear-attention's Triton kernels run on CUDA only, not on {device.type}"
    if not fla_available():
        return (f"it needs flash-linear-attention (package `fla`: the `gpu` extra, pip install 'shardwright[gpu]'), "
                f"which is not importable here ({fla_import_error()})")
    if dtype not in FLA_DTYPES:
        return f"flash-linear-attention's chunk_delta_rule takes fp16/bf16 inputs, not {dtype}"
    return None


def _delta_rule_fla(q, k, v, beta, initial_state, scale):  # pragma: no cover - needs CUDA + fla
    """Not run by CI (no CUDA, no fla there); benchmarks/gpu_suite.py ran it once on an H200 with fla
    0.6.0: output, final state and gradients within bf16 rounding of the chunked reference. fla takes the
    same [B, T, H, D] layout, beta [B, T, H] and state [B, H, Dk, Dv]; it needs q, k, v, beta in one dtype,
    reads the initial state in fp32 and returns the final state in fp32. Older fla versions default to
    head_first=True, so head_first=False is passed where the signature still has it."""
    chunk_delta_rule = _fla_chunk_delta_rule()
    kwargs = {"scale": q.shape[-1] ** -0.5 if scale is None else scale,
              "initial_state": None if initial_state is None else initial_state.float().contiguous(),
              "output_final_state": True}
    if "head_first" in inspect.signature(chunk_delta_rule).parameters:
        kwargs["head_first"] = False
    dt = q.dtype
    o, final_state = chunk_delta_rule(q.contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous(),
                                      beta.to(dt).contiguous(), **kwargs)
    return o.to(v.dtype), final_state


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
               initial_state: torch.Tensor | None = None, scale: float | None = None,
               chunk_size: int = 64, backend: str = "auto",
               document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], final_state [B, H, Dk, Dv]) of the delta rule; see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"delta rule: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_inputs(q, k, v, beta, initial_state, document_ids=document_ids)
    if backend == "auto":
        backend = "fla" if (q.is_cuda and q.dtype in FLA_DTYPES and fla_available()
                            and document_ids is None) else "chunked"
    if backend == "fla":
        if document_ids is not None:
            raise ValueError("delta rule: the fla backend is not wired for document_ids (packed documents); use "
                             "backend='chunked'")
        if (problem := fla_problem(q.device, q.dtype)) is not None:
            raise ValueError(f"delta rule: backend='fla': {problem}; use backend='chunked'")
        return _delta_rule_fla(q, k, v, beta, initial_state, scale)
    if backend == "recurrent":
        return delta_rule_recurrent(q, k, v, beta, initial_state, scale, document_ids)
    return delta_rule_chunked(q, k, v, beta, initial_state, scale, chunk_size, document_ids)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None = None,
                     scale: float | None = None, chunk_size: int = 64,
                     backend: str = "auto",
                     document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], final_state [B, H, Dk, Dv]) of plain linear attention; "auto" is "chunked"."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"linear attention: unknown backend {backend!r}; choose one of {', '.join(LINEAR_BACKENDS)}")
    if backend == "recurrent":
        return linear_attention_recurrent(q, k, v, initial_state, scale, document_ids)
    return linear_attention_chunked(q, k, v, initial_state, scale, chunk_size, document_ids)


def _check_rule(rule: str, beta: torch.Tensor | None) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown mixer rule {rule!r}; choose one of {', '.join(RULES)}")
    if (beta is None) != (rule == "linear"):
        raise ValueError(f"mixer rule {rule!r} " + ("takes no beta" if rule == "linear" else "needs beta"))


def apply_mixer_rule(rule: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None,
                     initial_state: torch.Tensor | None = None, chunk_size: int = 64,
                     backend: str = "auto",
                     document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, final_state) of `rule` ("delta" with beta, "linear" with beta=None); default scale."""
    _check_rule(rule, beta)
    if rule == "delta":
        return delta_rule(q, k, v, beta, initial_state, chunk_size=chunk_size, backend=backend,
                          document_ids=document_ids)
    return linear_attention(q, k, v, initial_state, chunk_size=chunk_size, backend=backend,
                            document_ids=document_ids)


def mixer_rule_state_map(rule: str, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None,
                         chunk_size: int = 64,
                         document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, S_ext) of a stretch of tokens under `rule`, for context parallelism's fold."""
    _check_rule(rule, beta)
    if rule == "delta":
        return delta_rule_state_map(k, v, beta, chunk_size=chunk_size, document_ids=document_ids)
    return linear_attention_state_map(k, v, document_ids)
