"""Shape checks, the compute dtype and the common start of the chunkwise ops."""
import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32, bf16, fp16) is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None,
                 initial_state: torch.Tensor | None = None, op: str = "delta rule") -> tuple[int, int, int, int, int]:
    """Validate the [B, T, H, D] layout; returns (B, T, H, Dk, Dv). `q` may be None (state maps),
    `beta` None (linear attention, which has none); `op` names the op in the error messages."""
    if k.dim() != 4:
        raise ValueError(f"{op}: k must be [B, T, H, Dk], got shape {tuple(k.shape)}")
    B, T, H, Dk = k.shape
    if q is not None and q.shape != k.shape:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: v must be [B, T, H, Dv] = {(B, T, H)} + (Dv,), got {tuple(v.shape)}")
    Dv = v.shape[3]
    if beta is not None and beta.shape != (B, T, H):
        raise ValueError(f"{op}: beta must be [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, Dv):
        raise ValueError(f"{op}: initial_state must be [B, H, Dk, Dv] = {(B, H, Dk, Dv)}, "
                         f"got {tuple(initial_state.shape)}")
    return B, T, H, Dk, Dv


def chunked_start(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None,
                  initial_state: torch.Tensor | None, scale: float | None, chunk_size: int, op: str):
    """What every chunkwise op starts from: (B, T, H, Dv, scale (default Dk^-1/2), compute dtype,
    initial state in it (zeros if None), chunk length, number of chunks), after the checks."""
    B, T, H, Dk, Dv = check_inputs(q, k, v, beta, initial_state, op=op)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    dtype = compute_dtype(q.dtype)
    state = q.new_zeros(B, H, Dk, Dv, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    chunk = max(1, min(chunk_size, T))
    return B, T, H, Dv, Dk ** -0.5 if scale is None else scale, dtype, state, chunk, -(-T // chunk)
