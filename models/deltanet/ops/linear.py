"""Plain linear attention: the delta rule's baseline, the same state without the erase term.

    S_t = S_{t-1} + k_t v_t^T,    o_t = S_t^T (scale * q_t)

per batch row and head (no feature map and no normalizer: the layer L2-normalizes q and k for both
rules, so the two differ only in the update). Layout, scale and dtypes as the delta rule's ops
(recurrent.py): q, k [B, T, H, Dk], v [B, T, H, Dv], states [B, H, Dk, Dv]; fp64 stays fp64,
everything else is computed in fp32; o in v's dtype, the final state in the compute dtype.

- `linear_attention_recurrent`  token by token, the reference.
- `linear_attention_chunked`    chunkwise: per chunk of C tokens with incoming state S,
                                O = Q S + tril(Q K^T) V and S' = S + K^T V. The incoming states are
                                an exclusive cumulative sum of the chunks' K^T V (no sequential scan:
                                the update does not depend on the state).
- `linear_attention_state_map`  a stretch of tokens as S -> M S + S_ext with M = I, S_ext = K^T V —
                                the form context parallelism folds (there the fold is a sum, LASP-2).
"""
import torch

from models.deltanet.ops._inputs import check_inputs, chunked_start, compute_dtype
from models.deltanet.ops.chunked import _to_chunks


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               initial_state: torch.Tensor | None = None,
                               scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], final_state [B, H, Dk, Dv]), one token at a time. scale defaults to Dk^-1/2."""
    B, T, H, Dk, Dv = check_inputs(q, k, v, None, initial_state, op="linear attention")
    scale = Dk ** -0.5 if scale is None else scale
    dt = compute_dtype(q.dtype)
    q, k, v = (x.to(dt) for x in (q, k, v))
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(dt)
    outputs = []
    for t in range(T):
        S = S + k[:, t].unsqueeze(-1) @ v[:, t].unsqueeze(-2)                # [B, H, Dk, Dv]
        outputs.append((scale * q[:, t].unsqueeze(-2)) @ S)                  # [B, H, 1, Dv]
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), S
    o = torch.cat(outputs, dim=-2).transpose(1, 2)                           # [B, T, H, Dv]
    return o.to(v.dtype), S


def linear_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             initial_state: torch.Tensor | None = None, scale: float | None = None,
                             chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], final_state [B, H, Dk, Dv]), chunk_size tokens at a time (any T >= 0)."""
    B, T, H, Dv, scale, dt, S, chunk, n_chunks = chunked_start(q, k, v, None, initial_state, scale, chunk_size,
                                                               op="linear attention")
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), S
    qc, kc, vc = (_to_chunks(x, chunk, n_chunks, dt) for x in (q, k, v))   # [B, H, N, C, D], zero-padded
    qc = qc * scale
    E = kc.transpose(-1, -2) @ vc                                            # [B, H, N, Dk, Dv]
    totals = S.unsqueeze(2) + E.cumsum(dim=2)                                # state after each chunk
    S_in = torch.cat([S.unsqueeze(2), totals[:, :, :-1]], dim=2)             # state before each chunk
    o = qc @ S_in + torch.tril(qc @ kc.transpose(-1, -2)) @ vc
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * chunk, H, Dv)[:, :T]
    return o.to(v.dtype), totals[:, :, -1]


def linear_attention_state_map(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M = I [B, H, Dk, Dk], S_ext = K^T V [B, H, Dk, Dv]) of the tokens k, v [B, T, H, D], in fp32
    (fp64 for fp64 inputs), the form `delta_rule_state_map` returns."""
    B, T, H, Dk, Dv = check_inputs(None, k, v, None, op="linear attention")
    dt = compute_dtype(k.dtype)
    S_ext = torch.einsum("bthk,bthv->bhkv", k.to(dt), v.to(dt))
    return torch.eye(Dk, dtype=dt, device=k.device).expand(B, H, Dk, Dk), S_ext
