"""The delta rule token by token: the reference every faster path is tested against.

Per batch row and head, with the state S in R^{Dk x Dv} (flash-linear-attention's orientation;
the DeltaNet paper stores the transpose):

    u_t = beta_t (v_t - S_{t-1}^T k_t)
    S_t = S_{t-1} + k_t u_t^T          = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

Layout: q, k [B, T, H, Dk], v [B, T, H, Dv], beta [B, T, H], states [B, H, Dk, Dv] — the
token-major layout the model's projections produce (and fla's Triton kernels take), so no
transposes are needed around the op. The caller L2-normalizes q and k; beta is used as given
(in (0, 1), or (0, 2) when the layer allows negative eigenvalues).

Packed documents: with `document_ids` [B, T] the state is reset to zero before every token whose
id differs from the previous token's, so each document sees only its own tokens (the first token
always continues `initial_state`).

Plain torch ops, so autograd gives the backward. fp64 inputs are computed in fp64, anything
else in fp32; o comes back in v's dtype and the final state in the compute dtype.
"""
import torch

from models.deltanet.ops._inputs import check_inputs, compute_dtype, document_starts


def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         initial_state: torch.Tensor | None = None,
                         scale: float | None = None,
                         document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], final_state [B, H, Dk, Dv]), one token at a time. scale defaults to Dk^-1/2."""
    B, T, H, Dk, Dv = check_inputs(q, k, v, beta, initial_state, document_ids=document_ids)
    scale = Dk ** -0.5 if scale is None else scale
    dt = compute_dtype(q.dtype)
    q, k, v, beta = (x.to(dt) for x in (q, k, v, beta))
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(dt)
    starts = document_starts(document_ids) if document_ids is not None else None
    outputs = []
    for t in range(T):
        if starts is not None:
            S = torch.where(starts[:, t, None, None, None], 0, S)            # a new document: zero state
        k_t = k[:, t].unsqueeze(-2)                                        # [B, H, 1, Dk]
        u_t = beta[:, t, :, None, None] * (v[:, t].unsqueeze(-2) - k_t @ S)  # [B, H, 1, Dv]
        S = S + k_t.transpose(-1, -2) @ u_t
        outputs.append((scale * q[:, t].unsqueeze(-2)) @ S)               # [B, H, 1, Dv]
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), S
    o = torch.cat(outputs, dim=-2).transpose(1, 2)                         # [B, T, H, Dv]
    return o.to(v.dtype), S
