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

Packed documents (`document_ids` [B, T]) reset the state at each document start, as the delta
rule's ops do (chunked.py has the masks): per chunk O = diag(r) Q S + (tril(Q K^T) masked to
same-document pairs) V and S' = r_last S + K^T diag(l) V. r_last is 0 after a boundary, so the
incoming states are a scan over chunks (one add per chunk) instead of the cumulative sum; the
state map has M = 0 in a row with a boundary and S_ext = K^T V over the last document.
"""
import torch

from models.deltanet.ops._inputs import check_inputs, chunked_start, compute_dtype, document_segments, document_starts
from models.deltanet.ops.chunked import _to_chunks, chunk_documents


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               initial_state: torch.Tensor | None = None,
                               scale: float | None = None,
                               document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], final_state [B, H, Dk, Dv]), one token at a time. scale defaults to Dk^-1/2.
    With document_ids [B, T] the state restarts from zero at each document start (as the delta rule's)."""
    B, T, H, Dk, Dv = check_inputs(q, k, v, None, initial_state, op="linear attention", document_ids=document_ids)
    scale = Dk ** -0.5 if scale is None else scale
    dt = compute_dtype(q.dtype)
    q, k, v = (x.to(dt) for x in (q, k, v))
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(dt)
    starts = document_starts(document_ids) if document_ids is not None else None
    outputs = []
    for t in range(T):
        if starts is not None:
            S = torch.where(starts[:, t, None, None, None], 0, S)
        S = S + k[:, t].unsqueeze(-1) @ v[:, t].unsqueeze(-2)                # [B, H, Dk, Dv]
        outputs.append((scale * q[:, t].unsqueeze(-2)) @ S)                  # [B, H, 1, Dv]
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), S
    o = torch.cat(outputs, dim=-2).transpose(1, 2)                           # [B, T, H, Dv]
    return o.to(v.dtype), S


def linear_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             initial_state: torch.Tensor | None = None, scale: float | None = None,
                             chunk_size: int = 64,
                             document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], final_state [B, H, Dk, Dv]), chunk_size tokens at a time (any T >= 0); with
    document_ids [B, T] the state restarts at each document start."""
    B, T, H, Dv, scale, dt, S, chunk, n_chunks = chunked_start(q, k, v, None, initial_state, scale, chunk_size,
                                                               op="linear attention", document_ids=document_ids)
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), S
    qc, kc, vc = (_to_chunks(x, chunk, n_chunks, dt) for x in (q, k, v))   # [B, H, N, C, D], zero-padded
    qc = qc * scale
    P = torch.tril(qc @ kc.transpose(-1, -2))
    if document_ids is None:
        E = kc.transpose(-1, -2) @ vc                                        # [B, H, N, Dk, Dv]
        totals = S.unsqueeze(2) + E.cumsum(dim=2)                            # state after each chunk
        S_in = torch.cat([S.unsqueeze(2), totals[:, :, :-1]], dim=2)         # state before each chunk
        o = qc @ S_in + P @ vc
    else:
        docs = chunk_documents(document_ids, chunk, n_chunks, dt)
        E = (kc * docs.last).transpose(-1, -2) @ vc
        states = [S]
        for n in range(n_chunks):
            states.append(docs.kept[:, :, n] * states[-1] + E[:, :, n])
        totals, S_in = torch.stack(states[1:], dim=2), torch.stack(states[:-1], dim=2)
        o = docs.reached * (qc @ S_in) + (P * docs.same) @ vc
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * chunk, H, Dv)[:, :T]
    return o.to(v.dtype), totals[:, :, -1]


def linear_attention_state_map(k: torch.Tensor, v: torch.Tensor,
                               document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M = I [B, H, Dk, Dk], S_ext = K^T V [B, H, Dk, Dv]) of the tokens k, v [B, T, H, D], in fp32
    (fp64 for fp64 inputs), the form `delta_rule_state_map` returns. With document_ids [B, T]: M = 0
    in rows with a document start after the first token, S_ext over the last document's tokens."""
    B, T, H, Dk, Dv = check_inputs(None, k, v, None, op="linear attention", document_ids=document_ids)
    dt = compute_dtype(k.dtype)
    M = torch.eye(Dk, dtype=dt, device=k.device).expand(B, H, Dk, Dk)
    k = k.to(dt)
    if document_ids is not None and T > 0:
        segments = document_segments(document_ids)
        M = M * (segments[:, -1] == 0).to(dt)[:, None, None, None]
        k = k * (segments == segments[:, -1:]).to(dt)[:, :, None, None]
    return M, torch.einsum("bthk,bthv->bhkv", k, v.to(dt))
