"""Shape checks, the compute dtype, document boundaries and the common start of the chunkwise ops."""
import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32, bf16, fp16) is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None,
                 initial_state: torch.Tensor | None = None, op: str = "delta rule",
                 document_ids: torch.Tensor | None = None) -> tuple[int, int, int, int, int]:
    """Validate the [B, T, H, D] layout and document_ids [B, T] (integers); returns (B, T, H, Dk, Dv).
    `q` may be None (state maps), `beta` None (linear attention, which has none); `op` names the op
    in the error messages."""
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
    if document_ids is not None and (document_ids.shape != (B, T) or document_ids.is_floating_point()
                                     or document_ids.is_complex()):
        raise ValueError(f"{op}: document_ids must be integers [B, T] = {(B, T)}, "
                         f"got {document_ids.dtype} {tuple(document_ids.shape)}")
    return B, T, H, Dk, Dv


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: True where a token's document id differs from the previous token's, i.e. where
    the state is reset to zero before the token. Never at t = 0: the stretch's first token continues
    the initial state's document (context parallelism decides that one across ranks)."""
    starts = torch.zeros_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_segments(document_ids: torch.Tensor) -> torch.Tensor:
    """int64 [B, T]: 0 for the tokens of a row's first document, +1 at every document start. Equal
    segments mean the same document even when ids are reused further on (only changes count)."""
    return document_starts(document_ids).cumsum(dim=1)


def chunked_start(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None,
                  initial_state: torch.Tensor | None, scale: float | None, chunk_size: int, op: str,
                  document_ids: torch.Tensor | None = None):
    """What every chunkwise op starts from: (B, T, H, Dv, scale (default Dk^-1/2), compute dtype,
    initial state in it (zeros if None), chunk length, number of chunks), after the checks."""
    B, T, H, Dk, Dv = check_inputs(q, k, v, beta, initial_state, op=op, document_ids=document_ids)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    dtype = compute_dtype(q.dtype)
    state = q.new_zeros(B, H, Dk, Dv, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    chunk = max(1, min(chunk_size, T))
    return B, T, H, Dv, Dk ** -0.5 if scale is None else scale, dtype, state, chunk, -(-T // chunk)
