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

Everything but the state scan is batched over all chunks at once: the solve, W, U, the chunk maps
(M, E), and finally the outputs. The scan itself is one [Dk, Dk] x [Dk, Dv] matmul per chunk.
Autograd keeps per chunk the incoming state and a few [C, C] / [C, D] tensors: about as much
memory as q, k, v themselves for C = 64 and D = 64.
"""
import torch
import torch.nn.functional as F

from models.deltanet.ops._inputs import chunked_start


def _to_chunks(x: torch.Tensor, chunk: int, n_chunks: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, N, C, D] in `dtype`, zero-padded at the end to N * C tokens."""
    B, T, H, D = x.shape
    x = x.to(dtype)
    pad = n_chunks * chunk - T
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(B, n_chunks, chunk, H, D).permute(0, 3, 1, 2, 4)


def chunk_pieces(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, chunk: int, dtype: torch.dtype):
    """The state-independent part of every chunk, batched over chunks.

    Returns kc [B, H, N, C, Dk], w [.., C, Dk], u [.., C, Dv], M [B, H, N, Dk, Dk], E [.., Dk, Dv]:
    chunk n maps its incoming state S to M_n S + E_n.
    """
    T, Dk = k.shape[1], k.shape[3]
    n_chunks = -(-T // chunk)
    kc = _to_chunks(k, chunk, n_chunks, dtype)
    vc = _to_chunks(v, chunk, n_chunks, dtype)
    bc = _to_chunks(beta.unsqueeze(-1), chunk, n_chunks, dtype)          # [B, H, N, C, 1]
    kb = kc * bc
    A = torch.tril(kb @ kc.transpose(-1, -2), diagonal=-1)
    eye_c = torch.eye(chunk, dtype=dtype, device=k.device)
    wu = torch.linalg.solve_triangular(A + eye_c, torch.cat([kb, vc * bc], dim=-1),
                                       upper=False, unitriangular=True)
    w, u = wu[..., :Dk], wu[..., Dk:]
    ktwu = kc.transpose(-1, -2) @ wu                                     # [B, H, N, Dk, Dk + Dv]
    M = torch.eye(Dk, dtype=dtype, device=k.device) - ktwu[..., :Dk]
    E = ktwu[..., Dk:]
    return kc, w, u, M, E


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       initial_state: torch.Tensor | None = None, scale: float | None = None,
                       chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], final_state [B, H, Dk, Dv]), chunk_size tokens at a time (any T >= 0)."""
    B, T, H, Dv, scale, dt, S, chunk, n_chunks = chunked_start(q, k, v, beta, initial_state, scale, chunk_size,
                                                               op="delta rule")
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), S
    kc, w, u, M, E = chunk_pieces(k, v, beta, chunk, dt)
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
    o = (qc - P @ w) @ S_in + P @ u                                      # = Q S + P (U - W S)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * chunk, H, Dv)[:, :T]
    return o.to(v.dtype), S
