"""The delta rule chunkwise-parallel (WY / UT transform), pure PyTorch; autograd gives the backward.

Same layout, scale and dtypes as `recurrent.py`. The sequence is cut into chunks of C tokens
(the tail chunk is zero-padded: a token with k = 0 and beta = 0 leaves the state unchanged, and
its outputs are dropped). Per chunk, with K, V, Q [C, D] (Q already scaled), beta [C] and the
incoming state S:

    A  = tril(diag(beta) K K^T, -1)                        strictly lower, [C, C]
    W  = (I + A)^{-1} diag(beta) K      U = (I + A)^{-1} diag(beta) V   (one unit-triangular solve)
    U' = U - W S                        the "pseudo values" u_t of the recurrence, given S
    O  = Q S + tril(Q K^T) U'           (diagonal included: o_t sees its own update)
    S' = S + K^T U' = (I - K^T W) S + K^T U = M S + E

Why: u_t = beta_t (v_t - S^T k_t - sum_{j<t} (k_t . k_j) u_j), i.e. (I + A) U' = diag(beta)(V - K S),
and I - K^T W is the WY form of the product of (I - beta_t k_t k_t^T) over the chunk.

Packed documents (`document_ids` [B, T]; the state restarts from zero at each document start, see
recurrent.py). Tokens j <= t interact only within one document, so every intra-chunk term is
masked to same-document pairs: A (so the solve stays block diagonal by document), and tril(Q K^T).
The incoming state S belongs to the document the chunk starts in (r_t = 1 for its tokens, 0 after
the chunk's first boundary); the outgoing state holds only the chunk's last document (l_t = 1 for
its tokens). Because the solve is block diagonal, diag(r) commutes with (I + A)^{-1}, and

    O  = diag(r) (Q - P W) S + P U,       P = tril(Q K^T) masked to same-document pairs
    S' = r_last (I - K^T W) S + K^T diag(l) U

so a boundary anywhere in a chunk costs a few elementwise masks, no per-token work.

Everything but the state scan is batched over all chunks at once: the solve, W, U, the chunk maps
(M, E), and finally the outputs. The scan itself is one [Dk, Dk] x [Dk, Dv] matmul per chunk.
Autograd keeps per chunk the incoming state and a few [C, C] / [C, D] tensors: about as much
memory as q, k, v themselves for C = 64 and D = 64.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.deltanet.ops._inputs import chunked_start, document_segments


def _to_chunks(x: torch.Tensor, chunk: int, n_chunks: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, N, C, D] in `dtype`, zero-padded at the end to N * C tokens."""
    B, T, H, D = x.shape
    x = x.to(dtype)
    pad = n_chunks * chunk - T
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(B, n_chunks, chunk, H, D).permute(0, 3, 1, 2, 4)


@dataclass
class ChunkDocuments:
    """Document masks per chunk (0/1 in the compute dtype), broadcasting over heads: [B, 1, N, ...]."""
    same: torch.Tensor      # [.., C, C]  tokens i, j of a chunk are in one document
    reached: torch.Tensor   # [.., C, 1]  token t is in the document of the chunk's incoming state (r)
    last: torch.Tensor      # [.., C, 1]  token t is in the chunk's last document (l)
    kept: torch.Tensor      # [.., 1, 1]  the incoming state survives the whole chunk (r_last)


def chunk_documents(document_ids: torch.Tensor, chunk: int, n_chunks: int, dtype: torch.dtype) -> ChunkDocuments:
    """The masks of `ChunkDocuments` from document_ids [B, T]; the zero-padded tail (k = 0, beta = 0)
    counts as the last document, which it cannot change."""
    segments = document_segments(document_ids)
    pad = n_chunks * chunk - segments.shape[1]
    segments = torch.cat([segments, segments[:, -1:].expand(-1, pad)], dim=1)
    segments = segments.reshape(segments.shape[0], 1, n_chunks, chunk)          # [B, 1, N, C]
    # The incoming state of chunk n belongs to the segment of the token before it (0 for chunk 0).
    carried = F.pad(segments[..., :-1, -1], (1, 0)).unsqueeze(-1)               # [B, 1, N, 1]
    reached = (segments == carried).to(dtype).unsqueeze(-1)
    return ChunkDocuments(same=(segments.unsqueeze(-1) == segments.unsqueeze(-2)).to(dtype), reached=reached,
                          last=(segments == segments[..., -1:]).to(dtype).unsqueeze(-1), kept=reached[..., -1:, :])


def chunk_pieces(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, chunk: int, dtype: torch.dtype,
                 docs: ChunkDocuments | None = None):
    """The state-independent part of every chunk, batched over chunks.

    Returns kc [B, H, N, C, Dk], w [.., C, Dk], u [.., C, Dv], M [B, H, N, Dk, Dk], E [.., Dk, Dv]:
    chunk n maps its incoming state S to M_n S + E_n (with `docs`, resetting at document starts).
    """
    T, Dk = k.shape[1], k.shape[3]
    n_chunks = -(-T // chunk)
    kc = _to_chunks(k, chunk, n_chunks, dtype)
    vc = _to_chunks(v, chunk, n_chunks, dtype)
    bc = _to_chunks(beta.unsqueeze(-1), chunk, n_chunks, dtype)          # [B, H, N, C, 1]
    kb = kc * bc
    A = torch.tril(kb @ kc.transpose(-1, -2), diagonal=-1)
    if docs is not None:
        A = A * docs.same
    eye_c = torch.eye(chunk, dtype=dtype, device=k.device)
    wu = torch.linalg.solve_triangular(A + eye_c, torch.cat([kb, vc * bc], dim=-1),
                                       upper=False, unitriangular=True)
    w, u = wu[..., :Dk], wu[..., Dk:]
    # Only the last document's tokens write into the outgoing state; where the chunk has a boundary
    # (kept = 0) M is 0, so masking K^T W along with K^T U changes nothing else.
    kl = kc if docs is None else kc * docs.last
    ktwu = kl.transpose(-1, -2) @ wu                                     # [B, H, N, Dk, Dk + Dv]
    M = torch.eye(Dk, dtype=dtype, device=k.device) - ktwu[..., :Dk]
    if docs is not None:
        M = M * docs.kept
    E = ktwu[..., Dk:]
    return kc, w, u, M, E


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       initial_state: torch.Tensor | None = None, scale: float | None = None,
                       chunk_size: int = 64,
                       document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], final_state [B, H, Dk, Dv]), chunk_size tokens at a time (any T >= 0); with
    document_ids [B, T] the state restarts at each document start."""
    B, T, H, Dv, scale, dt, S, chunk, n_chunks = chunked_start(q, k, v, beta, initial_state, scale, chunk_size,
                                                               op="delta rule", document_ids=document_ids)
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), S
    docs = chunk_documents(document_ids, chunk, n_chunks, dt) if document_ids is not None else None
    kc, w, u, M, E = chunk_pieces(k, v, beta, chunk, dt, docs)
    qc = _to_chunks(q, chunk, n_chunks, dt) * scale

    # The scan over chunks. unbind (not M[:, :, n]) so that the backward stacks the per-chunk
    # gradients once instead of filling a full-size zero tensor per chunk (quadratic in N).
    Ms = M.permute(2, 0, 1, 3, 4).flatten(1, 2).unbind(0)                # N x [B * H, Dk, Dk]
    Es = E.permute(2, 0, 1, 3, 4).flatten(1, 2).unbind(0)                # N x [B * H, Dk, Dv]
    S = S.flatten(0, 1)                                                  # [B * H, Dk, Dv]
    states = []                                                          # incoming state per chunk
    for M_n, E_n in zip(Ms, Es):
        states.append(S)
        S = torch.baddbmm(E_n, M_n, S)
    S_in = torch.stack(states, dim=1).unflatten(0, (B, H))               # [B, H, N, Dk, Dv]
    S = S.unflatten(0, (B, H))

    P = torch.tril(qc @ kc.transpose(-1, -2))                            # [B, H, N, C, C]
    if docs is None:
        o = (qc - P @ w) @ S_in + P @ u                                  # = Q S + P (U - W S)
    else:
        P = P * docs.same
        o = docs.reached * ((qc - P @ w) @ S_in) + P @ u
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * chunk, H, Dv)[:, :T]
    return o.to(v.dtype), S
