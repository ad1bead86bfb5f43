"""One stretch of tokens as an affine map of the state: the piece context parallelism folds.

Over a contiguous stretch of tokens (one cp rank's chunk of the sequence) the delta rule acts on
the incoming state affinely:

    S_out = M S_in + S_ext,   M = prod_t (I - beta_t k_t k_t^T)  (later tokens on the left), [Dk, Dk]
                              S_ext = the final state when S_in = 0,                      [Dk, Dv]

`delta_rule_state_map(k, v, beta)` returns (M, S_ext) per batch row and head, built from the
chunked machinery (`chunked.chunk_pieces`: each chunk's map M_n = I - K^T W, E_n = K^T U, composed
in order). M does not depend on q or v; it is computed in fp32 (fp64 for fp64 inputs) whatever the
input dtype, because a chain of such products loses accuracy fast in bf16.

How CP uses it (the hook itself lives in parallel/): rank r computes its map, the maps are
all-gathered, and rank r's incoming state is the *ordered* fold over ranks j < r of
`S <- M_j S + S_ext_j` (starting from the sequence's initial state, usually 0) —
`fold_state_maps`. The maps do not commute, so summing the S_ext (the LASP-2 shortcut for plain
linear attention) is wrong. Rank r then runs `delta_rule(..., initial_state=S_in_r)` on its chunk.
In backward, the gradient of S_in_r flows right to left through M_j^T; autograd through these
functions gives exactly that on one device (tested), a distributed hook has to do it by hand.
Packed documents (`document_ids`): a boundary inside the stretch cuts the map. S_in reaches only
the tokens before the first boundary, so M = 0 (per batch row) when there is one, and S_ext is the
state of the stretch's last document alone (built from the chunk maps, which reset; chunked.py).
The stretch's first token continues S_in's document; whether it does across cp ranks is the CP
hook's call (parallel/context/mixer.py), which zeroes M and S_in where it does not.

Cost: the map redoes the chunk solves that the rank's `delta_rule` call does again; a fused
version can share `chunk_pieces` between the two.
"""
import torch
import torch.nn.functional as F

from models.deltanet.ops._inputs import check_inputs, compute_dtype
from models.deltanet.ops.chunked import chunk_documents, chunk_pieces


def delta_rule_state_map(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, chunk_size: int = 64,
                         document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M [B, H, Dk, Dk], S_ext [B, H, Dk, Dv]) of the tokens k, v [B, T, H, D], beta [B, T, H]
    (document_ids [B, T]: reset at each document start)."""
    B, T, H, Dk, Dv = check_inputs(None, k, v, beta, document_ids=document_ids)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"delta rule: chunk_size must be a positive int, got {chunk_size!r}")
    dt = compute_dtype(k.dtype)
    # Carry [M | S_ext] as one [Dk, Dk + Dv] matrix: chunk n maps it to M_n [M | S_ext] + [0 | E_n].
    X = torch.cat([torch.eye(Dk, dtype=dt, device=k.device).expand(B * H, Dk, Dk),
                   k.new_zeros(B * H, Dk, Dv, dtype=dt)], dim=-1)
    if T > 0:
        chunk = min(chunk_size, T)
        docs = chunk_documents(document_ids, chunk, -(-T // chunk), dt) if document_ids is not None else None
        _, _, _, M, E = chunk_pieces(k, v, beta, chunk, dt, docs)
        Ms = M.permute(2, 0, 1, 3, 4).flatten(1, 2).unbind(0)
        Es = F.pad(E, (Dk, 0)).permute(2, 0, 1, 3, 4).flatten(1, 2).unbind(0)
        for M_n, E_n in zip(Ms, Es):
            X = torch.baddbmm(E_n, M_n, X)
    X = X.unflatten(0, (B, H))
    return X[..., :Dk], X[..., Dk:]


def apply_state_map(state_map: tuple[torch.Tensor, torch.Tensor], state: torch.Tensor) -> torch.Tensor:
    """M S + S_ext, in the map's dtype."""
    M, S_ext = state_map
    return M @ state.to(M.dtype) + S_ext


def compose_state_maps(first: tuple[torch.Tensor, torch.Tensor],
                       second: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The map of `first`'s tokens followed by `second`'s: (M2 M1, M2 S_ext1 + S_ext2)."""
    (M1, E1), (M2, E2) = first, second
    return M2 @ M1, M2 @ E1 + E2


def fold_state_maps(maps: list[tuple[torch.Tensor, torch.Tensor]],
                    initial_state: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Fold the maps of consecutive stretches in order: (incoming state of each stretch, final state)."""
    if not maps:
        raise ValueError("fold_state_maps: no maps to fold")
    S_ext0 = maps[0][1]
    S = torch.zeros_like(S_ext0) if initial_state is None else initial_state.to(S_ext0.dtype)
    incoming = []
    for state_map in maps:
        incoming.append(S)
        S = apply_state_map(state_map, S)
    return incoming, S
