"""models/deltanet/ops: chunkwise == recurrence (values and gradients), the affine state map CP folds,
packed documents (resets in the ops and cuts of the state maps), closed-form properties of the delta
rule, the plain-linear-attention baseline (the same checks, and its closed form), and the dispatchers."""
import pytest
import torch
import torch.nn.functional as F

import models.deltanet.ops as ops
from models.deltanet.ops import (apply_mixer_rule, compose_state_maps, delta_rule, delta_rule_chunked,
                                 delta_rule_recurrent, delta_rule_state_map, fold_state_maps, linear_attention,
                                 linear_attention_chunked, linear_attention_recurrent, linear_attention_state_map,
                                 mixer_rule_state_map)

F64, F32 = torch.float64, torch.float32
B, H, DK, DV = 2, 2, 16, 12  # Dk != Dv so that a transposed state cannot pass
TOL = {F64: 1e-10, F32: 1e-5}

def make_inputs(T: int, dtype=F64, seed: int = 0, beta_max: float = 1.0, state: bool = True):
    """q, k L2-normalized per head (as the layer does), beta in (0, beta_max), a non-zero initial state.
    Drawn in fp64 and then cast, so fp32 and fp64 runs see the same numbers."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, DK, generator=g, dtype=F64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, DK, generator=g, dtype=F64), dim=-1)
    v = torch.randn(B, T, H, DV, generator=g, dtype=F64)
    beta = beta_max * torch.sigmoid(2 * torch.randn(B, T, H, generator=g, dtype=F64))
    s0 = torch.randn(B, H, DK, DV, generator=g, dtype=F64) if state else None
    return [None if x is None else x.to(dtype) for x in (q, k, v, beta, s0)]


def leaves(tensors):
    return [None if x is None else x.detach().clone().requires_grad_() for x in tensors]


def err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference, relative to the largest entry of the reference."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def values_and_grads(fn, inputs, seed: int = 1, **kwargs):
    """o, final state, and the gradients of a random linear function of both w.r.t. every input."""
    xs = leaves(inputs)
    o, s = fn(*xs, **kwargs)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=F64).to(o.dtype)).sum() \
        + (s * torch.randn(s.shape, generator=g, dtype=F64).to(s.dtype)).sum()
    wrt = [x for x in xs if x is not None]
    return [o, s, *torch.autograd.grad(loss, wrt)]


NAMES = ["o", "final_state", "dq", "dk", "dv", "dbeta", "dS0"]
LINEAR_NAMES = ["o", "final_state", "dq", "dk", "dv", "dS0"]  # linear attention has no beta


def assert_all_close(got, ref, tol, names=NAMES):
    assert len(got) == len(ref)
    for name, a, b in zip(names, got, ref):
        assert a.shape == b.shape, name
        assert err(a, b) <= tol, f"{name}: {err(a, b):.2e} > {tol:.0e}"


# ---------------------------------------------------------------- chunkwise == recurrence

CASES = [(dt, c, 150, True) for dt in (F64, F32) for c in (16, 32, 64)]  # 150: no chunk size divides it
CASES += [(F64, 32, 128, True),   # a multiple of the chunk size
          (F64, 64, 5, True),     # shorter than one chunk
          (F64, 16, 1, True),     # one token
          (F64, 64, 100, False)]  # no initial state (zeros, no gradient)


def linear_inputs(T: int, dtype=F64, seed: int = 0, state: bool = True):
    q, k, v, _, s0 = make_inputs(T, dtype, seed, state=state)
    return [q, k, v, s0]


# rule -> (inputs, reference, fast path, names of the compared values)
RULES = {"delta": (make_inputs, delta_rule_recurrent, delta_rule_chunked, NAMES),
         "linear": (linear_inputs, linear_attention_recurrent, linear_attention_chunked, LINEAR_NAMES)}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype,chunk,T,state", CASES,
                         ids=[f"{str(d)[6:]}-C{c}-T{t}{'' if s else '-noS0'}" for d, c, t, s in CASES])
def test_chunked_matches_recurrence(rule, dtype, chunk, T, state):
    inputs_fn, reference, chunked, names = RULES[rule]
    inputs = inputs_fn(T, dtype, state=state)
    ref = values_and_grads(reference, inputs)
    got = values_and_grads(chunked, inputs, chunk_size=chunk)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_all_close(got, ref, TOL[dtype], names)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_negative_eigenvalues_match(dtype):
    """beta in (0, 2): I - beta k k^T has the eigenvalue 1 - beta < 0 along k."""
    inputs = make_inputs(150, dtype, seed=3, beta_max=2.0)
    assert (inputs[3] > 1.5).any()
    ref = values_and_grads(delta_rule_recurrent, inputs)
    for chunk in (16, 64):
        assert_all_close(values_and_grads(delta_rule_chunked, inputs, chunk_size=chunk), ref, TOL[dtype])


def gradcheck_inputs(length: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(q, k, v, beta, s0) of one head, small enough for finite differences, fp64, requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(1, length, 1, 3, generator=g, dtype=F64), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(1, length, 1, 3, generator=g, dtype=F64), dim=-1).requires_grad_()
    v = torch.randn(1, length, 1, 2, generator=g, dtype=F64, requires_grad=True)
    beta = torch.rand(1, length, 1, generator=g, dtype=F64, requires_grad=True)
    s0 = torch.randn(1, 1, 3, 2, generator=g, dtype=F64, requires_grad=True)
    return q, k, v, beta, s0


def test_chunked_backward_gradcheck():
    """The chunked backward against finite differences, independent of the reference."""
    assert torch.autograd.gradcheck(lambda *x: delta_rule_chunked(*x, chunk_size=3), gradcheck_inputs(7, seed=5))


def test_streaming_two_halves_equals_whole():
    q, k, v, beta, s0 = make_inputs(150, seed=7)
    o, s = delta_rule_chunked(q, k, v, beta, s0, chunk_size=32)
    o1, s1 = delta_rule_chunked(q[:, :70], k[:, :70], v[:, :70], beta[:, :70], s0, chunk_size=32)
    o2, s2 = delta_rule_chunked(q[:, 70:], k[:, 70:], v[:, 70:], beta[:, 70:], s1, chunk_size=32)
    assert err(torch.cat([o1, o2], dim=1), o) <= 1e-10
    assert err(s2, s) <= 1e-10


def test_long_fp32_stays_close_to_fp64():
    """fp32 chunked over many chunks against the fp64 recurrence: errors must not grow with T."""
    inputs = make_inputs(600, F64, seed=11)
    o_ref, s_ref = delta_rule_recurrent(*inputs)
    o, s = delta_rule_chunked(*[x.float() for x in inputs], chunk_size=16)
    assert err(o, o_ref) <= 1e-5 and err(s, s_ref) <= 1e-5


# ---------------------------------------------------------------- the affine state map (for CP)

PIECES = [40, 37, 50, 23]  # uneven, none a multiple of the chunk size; sums to 150


def split(x, dim=1):
    return list(torch.split(x, PIECES, dim=dim))


def test_state_map_is_the_product_of_householder_like_factors():
    """M = prod_t (I - beta_t k_t k_t^T), later tokens on the left; S_ext = final state from zero."""
    _, k, v, beta, _ = make_inputs(45, seed=2, beta_max=2.0)
    M, S_ext = delta_rule_state_map(k, v, beta, chunk_size=16)
    eye = torch.eye(DK, dtype=F64)
    expected = eye.expand(B, H, DK, DK)
    for t in range(45):
        kt = k[:, t].unsqueeze(-1)                                                      # [B, H, Dk, 1]
        expected = (eye - beta[:, t, :, None, None] * kt @ kt.transpose(-1, -2)) @ expected
    assert err(M, expected) <= 1e-10
    _, s_zero = delta_rule_recurrent(torch.zeros_like(k), k, v, beta)
    assert err(S_ext, s_zero) <= 1e-10


def test_folded_state_maps_equal_the_whole_sequence():
    """Per-piece maps folded in order give every piece its incoming state: final state, outputs and
    all gradients equal one pass over the whole sequence. Summing the pieces' S_ext instead fails."""
    inputs = make_inputs(150, seed=4)
    ref = values_and_grads(delta_rule_recurrent, inputs)

    def cp_like(q, k, v, beta, s0):
        maps = [delta_rule_state_map(kp, vp, bp, chunk_size=16)
                for kp, vp, bp in zip(split(k), split(v), split(beta))]
        incoming, final = fold_state_maps(maps, s0)
        outs = [delta_rule_chunked(qp, kp, vp, bp, s_in, chunk_size=16)[0]
                for qp, kp, vp, bp, s_in in zip(split(q), split(k), split(v), split(beta), incoming)]
        return torch.cat(outs, dim=1), final

    assert_all_close(values_and_grads(cp_like, inputs), ref, 1e-10)

    # negative control: the LASP-2 shortcut (add the S_ext, as if the maps commuted) is wrong here
    q, k, v, beta, s0 = inputs
    summed = s0 + sum(delta_rule_state_map(kp, vp, bp)[1] for kp, vp, bp in zip(split(k), split(v), split(beta)))
    assert err(summed, ref[1]) > 0.1


def test_compose_state_maps_equals_the_map_of_the_concatenation():
    _, k, v, beta, _ = make_inputs(90, seed=6)
    first = delta_rule_state_map(k[:, :33], v[:, :33], beta[:, :33], chunk_size=16)
    second = delta_rule_state_map(k[:, 33:], v[:, 33:], beta[:, 33:], chunk_size=16)
    M, S_ext = compose_state_maps(first, second)
    M_ref, S_ref = delta_rule_state_map(k, v, beta, chunk_size=32)
    assert err(M, M_ref) <= 1e-10 and err(S_ext, S_ref) <= 1e-10


@pytest.mark.parametrize("dtype,map_dtype", [(torch.bfloat16, F32), (F32, F32), (F64, F64)])
def test_state_map_is_kept_in_fp32_or_fp64(dtype, map_dtype):
    _, k, v, beta, _ = make_inputs(20, dtype)
    M, S_ext = delta_rule_state_map(k, v, beta)
    assert M.dtype == map_dtype and S_ext.dtype == map_dtype
    assert M.shape == (B, H, DK, DK) and S_ext.shape == (B, H, DK, DV)


# ---------------------------------------------------------------- packed documents

def document_ids(T: int, *rows: tuple[int, ...]) -> torch.Tensor:
    """[len(rows), T] ids 0, 1, 2, ...: row i starts a new document at each offset in rows[i]."""
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for row, starts in zip(ids, rows):
        for t in starts:
            row[t:] += 1
    return ids


# Chunk 8 over T = 40: boundaries on chunk edges (8, 16, 32), inside chunks (3, 21, 37), several in
# one chunk (17, 19, 21, 22), a one-token document (19 -> 21 has two tokens, 21 one, 37..39 the tail)
DOCUMENTS = document_ids(40, (3, 8, 16, 32, 37), (17, 19, 21, 22, 32))
PACKED = {"delta": (make_inputs, delta_rule_recurrent, delta_rule_chunked, NAMES),
          "linear": (linear_inputs, linear_attention_recurrent, linear_attention_chunked, LINEAR_NAMES)}


@pytest.mark.parametrize("rule", PACKED)
@pytest.mark.parametrize("chunk", [4, 8, 16, 64])
def test_documents_chunked_matches_recurrence(rule, chunk):
    """Values and gradients of the chunked op with document resets against the token-by-token
    reference (fp64); with a chunk of 8 the boundaries fall on chunk edges, inside chunks and
    several in one chunk, and 64 puts them all in one chunk."""
    inputs_fn, reference, chunked, names = PACKED[rule]
    inputs = inputs_fn(40, seed=21, **({"beta_max": 2.0} if rule == "delta" else {}))
    ref = values_and_grads(reference, inputs, document_ids=DOCUMENTS)
    assert_all_close(values_and_grads(chunked, inputs, chunk_size=chunk, document_ids=DOCUMENTS), ref, 1e-10, names)
    # mask-off control: the same op without the document ids is far off
    assert err(values_and_grads(chunked, inputs, chunk_size=chunk)[0], ref[0]) > 0.1


def test_documents_chunked_fp32_matches_fp64_reference():
    inputs = make_inputs(40, seed=22)
    o_ref, s_ref = delta_rule_recurrent(*inputs, document_ids=DOCUMENTS)
    o, s = delta_rule_chunked(*[x.float() for x in inputs], chunk_size=8, document_ids=DOCUMENTS)
    assert err(o, o_ref) <= 1e-5 and err(s, s_ref) <= 1e-5


@pytest.mark.parametrize("fn", [delta_rule_recurrent, lambda *a, **kw: delta_rule_chunked(*a, chunk_size=8, **kw)],
                         ids=["recurrent", "chunked"])
def test_each_document_equals_the_document_alone(fn):
    """Each document of a packed row gives the outputs of that document run alone from a zero state
    (the first one from the initial state), and the final state is the last document's."""
    q, k, v, beta, s0 = make_inputs(40, seed=23)
    o, s = fn(q, k, v, beta, s0, document_ids=DOCUMENTS)
    for row in range(B):
        edges = [0, *document_starts_of(DOCUMENTS[row]), 40]
        for index, (lo, hi) in enumerate(zip(edges, edges[1:])):
            alone = [x[row:row + 1, lo:hi] for x in (q, k, v, beta)]
            o_alone, s_alone = delta_rule_recurrent(*alone, s0[row:row + 1] if index == 0 else None)
            assert err(o[row:row + 1, lo:hi], o_alone) <= 1e-12, (row, lo, hi)
        assert err(s[row:row + 1], s_alone) <= 1e-12


def document_starts_of(ids: torch.Tensor) -> list[int]:
    return (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()


def test_documents_chunked_backward_gradcheck():
    ids = document_ids(9, (2, 3, 7))
    assert torch.autograd.gradcheck(lambda *x: delta_rule_chunked(*x, chunk_size=3, document_ids=ids),
                                    gradcheck_inputs(9, seed=24))


@pytest.mark.parametrize("rule", PACKED)
@pytest.mark.parametrize("pieces", [[11, 5, 16, 8], [8, 8, 16, 8]], ids=["cut", "aligned"])
def test_documents_cut_the_state_maps(rule, pieces):
    """What context parallelism does with documents, on one device: each piece's map resets at its
    documents (M = 0 past a boundary), and where a piece starts a new document its incoming state and
    its M are zeroed; folded in order this gives the whole sequence's outputs, final state and
    gradients. "cut": pieces of 11, 5, 16, 8 tokens (the piece at 11 starts inside a document, the
    one at 16 at a boundary); "aligned": piece edges on boundaries."""
    inputs_fn, reference, chunked, names = PACKED[rule]
    inputs = inputs_fn(40, seed=25)
    ref = values_and_grads(reference, inputs, document_ids=DOCUMENTS)
    ids = list(torch.split(DOCUMENTS, pieces, dim=1))

    def cp_like(*xs):
        *tensors, s0 = xs
        beta = tensors[3] if rule == "delta" else None
        parts = [list(torch.split(x, pieces, dim=1)) for x in tensors[:3]]
        betas = list(torch.split(beta, pieces, dim=1)) if beta is not None else [None] * len(pieces)
        maps, continues = [], []
        for j, (kp, vp, bp, ip) in enumerate(zip(parts[1], parts[2], betas, ids)):
            same = torch.ones(B, dtype=F64) if j == 0 else (ip[:, 0] == ids[j - 1][:, -1]).to(F64)
            continues.append(same[:, None, None, None])
            M, S_ext = mixer_rule_state_map(rule, kp, vp, bp, chunk_size=4, document_ids=ip)
            maps.append((continues[-1] * M, S_ext))
        incoming, final = fold_state_maps(maps, s0)
        outs = [apply_mixer_rule(rule, qp, kp, vp, bp, keep * s_in, chunk_size=4, document_ids=ip)[0]
                for qp, kp, vp, bp, s_in, keep, ip in zip(*parts, betas, incoming, continues, ids)]
        return torch.cat(outs, dim=1), final

    assert_all_close(values_and_grads(cp_like, inputs), ref, 1e-10, names)


@pytest.mark.parametrize("call,message", [
    (lambda x, ids: delta_rule(*x, document_ids=ids[:, :5]), "document_ids must be"),
    (lambda x, ids: delta_rule(*x, document_ids=ids.double()), "document_ids must be"),
    (lambda x, ids: delta_rule_state_map(*x[1:4], document_ids=ids[:1]), "document_ids must be"),
    (lambda x, ids: delta_rule(*x, document_ids=ids, backend="fla"), "not wired for document_ids")])
def test_document_id_errors(call, message):
    inputs = make_inputs(6)
    with pytest.raises(ValueError, match=message):
        call(inputs, document_ids(6, (2,), (4,)))


# ---------------------------------------------------------------- closed forms

BOTH = [delta_rule_recurrent, lambda *a, **kw: delta_rule_chunked(*a, chunk_size=16, **kw)]
BOTH_IDS = ["recurrent", "chunked"]


@pytest.mark.parametrize("fn", BOTH, ids=BOTH_IDS)
def test_beta_zero_leaves_the_state_unchanged(fn):
    q, k, v, beta, s0 = make_inputs(40, seed=8)
    o, s = fn(q, k, v, torch.zeros_like(beta), s0, scale=0.7)
    assert err(s, s0) <= 1e-12
    assert err(o, 0.7 * torch.einsum("bthk,bhkv->bthv", q, s0)) <= 1e-12


@pytest.mark.parametrize("fn", BOTH, ids=BOTH_IDS)
def test_one_token_from_zero_state(fn):
    """S_1 = beta k v^T and o = beta (k . q) v (times the scale, default Dk^-1/2)."""
    q, k, v, beta, _ = make_inputs(1, seed=9)
    o, s = fn(q, k, v, beta)
    b = beta[:, 0, :, None]
    assert err(s, b[..., None] * k[:, 0, :, :, None] * v[:, 0, :, None, :]) <= 1e-12
    kq = (k[:, 0] * q[:, 0]).sum(-1, keepdim=True)
    assert err(o[:, 0], DK ** -0.5 * b * kq * v[:, 0]) <= 1e-12


@pytest.mark.parametrize("fn", BOTH, ids=BOTH_IDS)
def test_beta_one_writes_the_value_it_reads_back(fn):
    """With beta_T = 1 and a unit k_T, the last step overwrites: S_T^T k_T = v_T, whatever came before."""
    q, k, v, beta, s0 = make_inputs(37, seed=10)
    beta[:, -1] = 1.0
    _, s = fn(q, k, v, beta, s0)
    assert err(torch.einsum("bhkv,bhk->bhv", s, k[:, -1]), v[:, -1]) <= 1e-12


def test_recurrence_equals_the_paper_orientation():
    """The DeltaNet paper stores the transpose: S <- S (I - beta k k^T) + beta v k^T, o = S q."""
    q, k, v, beta, s0 = make_inputs(20, seed=12)
    o, s = delta_rule_recurrent(q, k, v, beta, s0, scale=1.0)
    S = s0.transpose(-1, -2)                                                           # [B, H, Dv, Dk]
    eye = torch.eye(DK, dtype=F64)
    for t in range(20):
        kt, b = k[:, t].unsqueeze(-1), beta[:, t, :, None, None]
        S = S @ (eye - b * kt @ kt.transpose(-1, -2)) + b * v[:, t].unsqueeze(-1) @ kt.transpose(-1, -2)
        assert err(o[:, t], (S @ q[:, t].unsqueeze(-1)).squeeze(-1)) <= 1e-12
    assert err(s, S.transpose(-1, -2)) <= 1e-12


def test_empty_sequence_returns_the_initial_state():
    q, k, v, beta, s0 = make_inputs(0)
    for fn in (delta_rule_recurrent, delta_rule_chunked):
        o, s = fn(q, k, v, beta, s0)
        assert o.shape == (B, 0, H, DV) and torch.equal(s, s0)


def test_bf16_inputs_compute_in_fp32():
    inputs = make_inputs(100, seed=13)
    o_ref, s_ref = delta_rule_recurrent(*inputs)
    o, s = delta_rule(*[x.bfloat16() for x in inputs])
    assert o.dtype == torch.bfloat16 and s.dtype == F32
    assert err(o, o_ref) <= 3e-2 and err(s, s_ref) <= 3e-2


# ---------------------------------------------------------------- plain linear attention (the baseline)

def test_linear_recurrence_closed_form():
    """No erase: S_t = S_0 + sum_{j<=t} k_j v_j^T, so o_t = scale q_t^T S_t from a cumulative sum."""
    q, k, v, s0 = linear_inputs(60, seed=16)
    o, s = linear_attention_recurrent(q, k, v, s0, scale=0.3)
    states = s0.unsqueeze(1) + torch.einsum("bthk,bthv->bthkv", k, v).cumsum(dim=1)  # [B, T, H, Dk, Dv]
    assert err(s, states[:, -1]) <= 1e-12
    assert err(o, 0.3 * torch.einsum("bthk,bthkv->bthv", q, states)) <= 1e-12


def test_linear_chunked_backward_gradcheck():
    g = torch.Generator().manual_seed(17)
    q, k = (F.normalize(torch.randn(1, 7, 1, 3, generator=g, dtype=F64), dim=-1).requires_grad_() for _ in range(2))
    v = torch.randn(1, 7, 1, 2, generator=g, dtype=F64, requires_grad=True)
    s0 = torch.randn(1, 1, 3, 2, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: linear_attention_chunked(*x, chunk_size=3), (q, k, v, s0))


def test_linear_state_maps_fold_to_the_whole_sequence():
    """(I, K^T V) per piece, folded in order, gives every piece its incoming state: outputs, final
    state and all gradients equal one pass. Here the fold is also the sum of the pieces' S_ext."""
    inputs = linear_inputs(150, seed=18)
    ref = values_and_grads(linear_attention_recurrent, inputs)

    def cp_like(q, k, v, s0):
        maps = [linear_attention_state_map(kp, vp) for kp, vp in zip(split(k), split(v))]
        assert all(torch.equal(M, torch.eye(DK, dtype=F64).expand_as(M)) for M, _ in maps)
        incoming, final = fold_state_maps(maps, s0)
        outs = [linear_attention_chunked(qp, kp, vp, s_in, chunk_size=16)[0]
                for qp, kp, vp, s_in in zip(split(q), split(k), split(v), incoming)]
        return torch.cat(outs, dim=1), final

    assert_all_close(values_and_grads(cp_like, inputs), ref, 1e-10, LINEAR_NAMES)
    _, k, v, s0 = inputs
    assert err(s0 + sum(linear_attention_state_map(kp, vp)[1] for kp, vp in zip(split(k), split(v))), ref[1]) <= 1e-10


def test_linear_is_not_the_delta_rule():
    """The two rules agree on the first token only when beta = 1 (nothing to erase yet), then differ."""
    q, k, v, _, _ = make_inputs(30, seed=19)
    o_lin, _ = linear_attention_recurrent(q, k, v)
    o_delta, _ = delta_rule_recurrent(q, k, v, torch.ones(B, 30, H, dtype=F64))
    assert err(o_lin[:, :1], o_delta[:, :1]) <= 1e-12 and err(o_lin, o_delta) > 0.1


def test_mixer_rule_dispatch():
    q, k, v, beta, s0 = make_inputs(50, seed=20)
    for got, ref in [(apply_mixer_rule("delta", q, k, v, beta, s0, chunk_size=16),
                      delta_rule_chunked(q, k, v, beta, s0, chunk_size=16)),
                     (apply_mixer_rule("linear", q, k, v, None, s0, chunk_size=16),
                      linear_attention_chunked(q, k, v, s0, chunk_size=16)),
                     (linear_attention(q, k, v, s0, backend="recurrent"), linear_attention_recurrent(q, k, v, s0)),
                     (mixer_rule_state_map("linear", k, v, None), linear_attention_state_map(k, v)),
                     (mixer_rule_state_map("delta", k, v, beta, 16), delta_rule_state_map(k, v, beta, 16))]:
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("call,message", [
    (lambda q, k, v, beta: apply_mixer_rule("gated", q, k, v, beta), "unknown mixer rule"),
    (lambda q, k, v, beta: apply_mixer_rule("linear", q, k, v, beta), "takes no beta"),
    (lambda q, k, v, beta: apply_mixer_rule("delta", q, k, v, None), "needs beta"),
    (lambda q, k, v, beta: linear_attention(q, k, v, backend="fla"), "unknown backend"),
    (lambda q, k, v, beta: linear_attention(q, k, v[:, :5]), "linear attention: v must be"),
    (lambda q, k, v, beta: linear_attention(q, k, v, chunk_size=0), "chunk_size")])
def test_linear_and_rule_errors(call, message):
    q, k, v, beta, _ = make_inputs(6)
    with pytest.raises(ValueError, match=message):
        call(q, k, v, beta)


# ---------------------------------------------------------------- dispatch and input checks

def test_backends_dispatch():
    inputs = make_inputs(50, seed=14)
    for got, ref in [(delta_rule(*inputs), delta_rule_chunked(*inputs)),  # auto on CPU: chunked
                     (delta_rule(*inputs, chunk_size=16, backend="chunked"), delta_rule_chunked(*inputs, chunk_size=16)),
                     (delta_rule(*inputs, backend="recurrent"), delta_rule_recurrent(*inputs))]:
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_fla_backend_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ops, "_fla_chunk_delta_rule", lambda: None)
    with pytest.raises(ValueError, match="backend='fla': flash-linear-attention's Triton kernels run on CUDA only"):
        delta_rule(*make_inputs(4), backend="fla")  # off CUDA the device is the reason, fla or not
    assert "not importable here" in ops.fla_problem(torch.device("cuda"), torch.bfloat16)  # a device named, not used


def test_fla_is_never_used_for_cpu_tensors(monkeypatch):
    def fake_fla(*args, **kwargs):
        raise AssertionError("fla called with CPU tensors")
    monkeypatch.setattr(ops, "_fla_chunk_delta_rule", lambda: fake_fla)
    inputs = [x.bfloat16() for x in make_inputs(4)]
    with pytest.raises(ValueError, match="CUDA"):
        delta_rule(*inputs, backend="fla")
    delta_rule(*inputs)  # auto: falls back to chunked


@pytest.mark.parametrize("change,message", [("backend", "unknown backend"), ("beta", "beta must be"),
                                            ("v", "v must be"), ("state", "initial_state must be"),
                                            ("q", "same shape"), ("chunk", "chunk_size")])
def test_bad_inputs_are_value_errors(change, message):
    q, k, v, beta, s0 = make_inputs(6)
    kwargs = {}
    if change == "backend":
        kwargs["backend"] = "triton"
    elif change == "beta":
        beta = beta.unsqueeze(-1)
    elif change == "v":
        v = v[:, :5]
    elif change == "state":
        s0 = s0.transpose(-1, -2)
    elif change == "q":
        q = q[..., :8]
    else:
        kwargs["chunk_size"] = 0
    with pytest.raises(ValueError, match=message):
        delta_rule(q, k, v, beta, s0, **kwargs)


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.fla_available()), reason="needs CUDA and fla")
def test_fla_matches_chunked_on_gpu():  # pragma: no cover - not run on the CPU machines
    inputs = [x.cuda() for x in make_inputs(300, seed=15)]
    o_ref, s_ref = delta_rule_chunked(*inputs)
    o, s = delta_rule(*[x.bfloat16() for x in inputs[:4]], inputs[4].float(), backend="fla")
    assert err(o, o_ref) <= 2e-2 and err(s, s_ref) <= 2e-2
