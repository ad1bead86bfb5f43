"""Context-parallel attention against full single-device attention, in gloo worlds of 2, 3 and 4.

Every rank draws the same seeded full q, k, v and upstream gradient, computes the fp64 reference
(plain softmax + autograd) on the whole sequence, runs the distributed version on its shard and
compares its shard of out, lse, dq, dk, dv. fp64 runs must match to 1e-10, fp32 to 1e-5.
"""
import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from parallel.context import (HYBRID_MESH_DIMS, ContextParallelAttention, SequenceLayout, StatePassingMixer,
                              context_parallel_mix, hybrid_attention, ring_attention, ulysses_attention)
from tests.distributed.harness import CheckResult, run_world
from tests.unit.test_context_kernels import reference_with_grads

THIS = "tests.distributed.test_context_parallel"
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
HEADS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}
KERNEL_DTYPES = [("math", "float64"), ("cpu_flash", "float64"), ("cpu_flash", "float32")]


def parity_cases(mode: str, layout: str, cp: int, shape: tuple[int, int] | None = None) -> list[dict]:
    return [dict(mode=mode, layout=layout, cp=cp, shape=shape, kernel=kernel, dtype=dtype, heads=heads, causal=causal)
            for kernel, dtype in KERNEL_DTYPES for heads in HEADS.values() for causal in (True, False)]


# world size -> parity cases run in that world
PARITY = {
    2: parity_cases("ring", "zigzag", 2) + parity_cases("ulysses", "contiguous", 2),
    3: parity_cases("ring", "contiguous", 3),
    4: (parity_cases("ring", "zigzag", 4) + parity_cases("ulysses", "contiguous", 4)
        + parity_cases("hybrid", "zigzag", 4, shape=(2, 2)) + parity_cases("hybrid", "contiguous", 4, shape=(2, 2))),
}
MODULE_MODES = {2: ["ring", "ulysses"], 3: ["ring"], 4: ["ring", "ulysses", "hybrid"]}


def case_id(case: dict) -> str:
    heads = {v: k for k, v in HEADS.items()}[tuple(case["heads"])]
    return (f"{case['mode']}-{case['layout']}-cp{case['cp']}-{case['kernel']}-{case['dtype']}-{heads}-"
            f"{'causal' if case['causal'] else 'full'}")


# ---- check bodies: run on every rank of a world ----

@functools.cache
def _hybrid_mesh(ring: int, ulysses: int):
    return init_device_mesh("cpu", (ring, ulysses), mesh_dim_names=HYBRID_MESH_DIMS)


def _layout(mode: str, layout: str, cp: int, shape):
    if mode == "hybrid":
        return SequenceLayout(layout, ring_size=shape[0], ulysses_size=shape[1])
    return SequenceLayout(layout, ring_size=cp) if mode == "ring" else SequenceLayout(layout, 1, ulysses_size=cp)


def _run_distributed(mode, layout, cp, shape, kernel, causal, q, k, v, dout, via_module=False):
    """(out, lse or None, dq, dk, dv) of this rank's shard."""
    group = _hybrid_mesh(*shape) if mode == "hybrid" else dist.group.WORLD
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if via_module:
        out, lse = ContextParallelAttention(mode, group, layout=layout, kernel=kernel, causal=causal)(*leaves), None
    else:
        attention = {"ring": ring_attention, "ulysses": ulysses_attention, "hybrid": hybrid_attention}[mode]
        out, lse = attention(*leaves, group, causal=causal, layout=layout, kernel=kernel)
    out.backward(dout)
    return (out.detach(), lse, *(t.grad for t in leaves))


def _full_inputs(heads, dtype, seq, seed=0, batch=2, dim=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads[0], dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, seq, heads[1], dim, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(batch, seq, heads[0], dim, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def parity(mode: str, layout: str, cp: int, shape, kernel: str, dtype: str, heads, causal: bool,
           via_module: bool = False, shard_layout: str | None = None) -> dict[str, float]:
    """Max abs error of this rank's out, lse, dq, dk, dv against the fp64 full-sequence reference.

    shard_layout (a negative control) shards the inputs in another layout than the attention assumes.
    """
    rank = dist.get_rank()
    seq = 8 * cp
    q, k, v, dout = _full_inputs(heads, dtype, seq)
    want = reference_with_grads(q, k, v, dout, causal)
    data_layout = _layout(mode, shard_layout or layout, cp, shape)
    local = [data_layout.shard(t.to(getattr(torch, dtype)), rank) for t in (q, k, v, dout)]
    got = _run_distributed(mode, layout, cp, shape, kernel, causal, *local, via_module=via_module)
    attention_layout = _layout(mode, layout, cp, shape)
    errors = {}
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        if g is None:
            continue
        w = attention_layout.shard(w, rank, dim=2 if name == "lse" else 1)
        assert g.shape == w.shape, f"{name}: {tuple(g.shape)} vs {tuple(w.shape)}"
        errors[name] = (g.double() - w).abs().max().item()
    return errors


def _document_ids(pattern: str, seq: int, chunk: int) -> torch.Tensor:
    """[2, seq] ids: "chunks": every document one layout chunk (every off-diagonal ring block is skipped);
    "spanning": row 0 has a document across most chunks, row 1 documents of 3 tokens (blocks partly masked)."""
    if pattern == "chunks":
        return (torch.arange(seq) // chunk).expand(2, seq)
    lengths = [[3, seq - 8, 5], [3] * (seq // 3) + [seq % 3] * (seq % 3 > 0)]
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths])


def document_parity(mode: str, layout: str, cp: int, shape, kernel: str, dtype: str, pattern: str,
                    without_documents: bool = False) -> dict[str, float]:
    """Max abs error of this rank's out, lse, dq, dk, dv with packed documents (causal inside each) against
    plain softmax over the whole sequence with the documents' mask and autograd (fp64). without_documents (a
    negative control) runs the distributed attention plain causal."""
    rank = dist.get_rank()
    seq = 8 * cp
    q, k, v, dout = _full_inputs((8, 2), dtype, seq)
    sequence_layout = _layout(mode, layout, cp, shape)
    ids = _document_ids(pattern, seq, seq // (sequence_layout.chunks_per_ring_rank * sequence_layout.ring_size))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    k_full, v_full = (t.repeat_interleave(4, dim=2) for t in leaves[1:])  # 8 query heads read 2 kv heads
    scores = torch.einsum("bqhd,bkhd->bhqk", leaves[0], k_full) * 8 ** -0.5
    visible = (ids.unsqueeze(2) == ids.unsqueeze(1)) & torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    want_out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v_full)
    want_out.backward(dout)
    want = (want_out.detach(), torch.logsumexp(scores, -1).detach(), *(t.grad for t in leaves))
    local = [sequence_layout.shard(t.to(getattr(torch, dtype)), rank) for t in (q, k, v, dout)]
    group = _hybrid_mesh(*shape) if mode == "hybrid" else dist.group.WORLD
    local_leaves = [t.clone().requires_grad_() for t in local[:3]]
    attention = {"ring": ring_attention, "ulysses": ulysses_attention, "hybrid": hybrid_attention}[mode]
    out, lse = attention(*local_leaves, group, causal=True, layout=layout, kernel=kernel,
                         document_ids=None if without_documents else sequence_layout.shard(ids, rank))
    out.backward(local[3])
    got = (out.detach(), lse, *(t.grad for t in local_leaves))
    return {name: (g.double() - sequence_layout.shard(w, rank, dim=2 if name == "lse" else 1)).abs().max().item()
            for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want)}


# world size -> (mode, layout, shape) of the packed-document parity cases run in that world
DOCUMENT_MODES = {2: [("ring", "zigzag", None), ("ulysses", "contiguous", None)],
                  4: [("ring", "zigzag", None), ("hybrid", "zigzag", (2, 2))]}
DOCUMENT_CASES = [(nproc, dict(mode=mode, layout=layout, cp=nproc, shape=shape, kernel=kernel, dtype=dtype,
                               pattern=pattern))
                  for nproc, modes in DOCUMENT_MODES.items() for mode, layout, shape in modes
                  for kernel, dtype in KERNEL_DTYPES for pattern in ("chunks", "spanning")]


def document_case_id(case: dict) -> str:
    return f"documents-{case['mode']}-cp{case['cp']}-{case['kernel']}-{case['dtype']}-{case['pattern']}"


def bitwise_repeatable(mode: str, cp: int, shape=None) -> bool:
    """Two fp32 runs of the same case give bitwise equal out, lse and gradients."""
    layout = _layout(mode, "zigzag", cp, shape)
    local = [layout.shard(t.float(), dist.get_rank()) for t in _full_inputs((8, 2), "float32", 8 * cp, seed=1)]
    first, second = (_run_distributed(mode, "zigzag", cp, shape, "cpu_flash", True, *local) for _ in range(2))
    return all(torch.equal(a, b) for a, b in zip(first, second))


def error_message(case: str) -> str:
    """The ValueError a misuse raises on every rank (before any communication)."""
    seven = torch.zeros(1, 3, 7, 8)
    try:
        if case == "ulysses_heads":
            ulysses_attention(seven, seven, seven, dist.group.WORLD)
        elif case == "zigzag_odd_local_length":
            ring_attention(seven, seven, seven, dist.group.WORLD, layout="zigzag")
        elif case == "hybrid_wants_a_mesh":
            ContextParallelAttention("hybrid", dist.group.WORLD)
        elif case == "hybrid_mesh_dims":
            ContextParallelAttention("hybrid", init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b")))
    except ValueError as error:
        return str(error)
    return "no error"


class ToyAffineMixer(StatePassingMixer):
    """A test-only linear recurrence S_t = A_t S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (no order-free
    shortcut: the A_t do not commute), written as the plain loop a real mixer's kernel would replace."""

    @staticmethod
    def _run(state, q, k, v, a):
        outputs = []
        for t in range(q.shape[1]):
            state = a[:, t] @ state + k[:, t, :, None] * v[:, t, None, :]
            outputs.append((state * q[:, t, :, None]).sum(1))
        return state, outputs

    def chunk_map(self, q, k, v, a):
        transition = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a[:, 0])
        for t in range(a.shape[1]):
            transition = a[:, t] @ transition
        state, _ = self._run(torch.zeros(q.shape[0], k.shape[-1], v.shape[-1], dtype=q.dtype), q, k, v, a)
        return transition, state

    def mix(self, initial_state, q, k, v, a):
        return torch.stack(self._run(initial_state, q, k, v, a)[1], dim=1)


def mixer_parity(summed_states: bool = False) -> float:
    """Max abs error of the state-passing hook's output and input gradients against the whole-sequence
    recurrence (fp64). summed_states (a negative control, output only) adds the earlier ranks' S_ext
    instead of folding their maps in order."""
    rank, cp = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(7)
    seq, key_dim, value_dim = 4 * cp, 3, 2
    q, k = (torch.randn(2, seq, key_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, seq, value_dim, generator=gen, dtype=torch.float64)
    a = torch.eye(key_dim, dtype=torch.float64) + 0.3 * torch.randn(2, seq, key_dim, key_dim, generator=gen,
                                                                    dtype=torch.float64)
    dout = torch.randn(2, seq, value_dim, generator=gen, dtype=torch.float64)
    mixer = ToyAffineMixer()
    full = [t.clone().requires_grad_() for t in (q, k, v, a)]
    want_out = mixer.mix(torch.zeros(2, key_dim, value_dim, dtype=torch.float64), *full)
    want_out.backward(dout)
    part = slice(rank * 4, rank * 4 + 4)
    local = [t[:, part].clone().requires_grad_() for t in (q, k, v, a)]
    if summed_states:
        state = mixer.chunk_map(*local)[1].detach()
        states = state.new_empty((cp, *state.shape))
        dist.all_gather_into_tensor(states.flatten(0, 1), state)
        return (mixer.mix(states[:rank].sum(0), *local) - want_out[:, part]).abs().max().item()
    out = context_parallel_mix(mixer, dist.group.WORLD, *local)
    out.backward(dout[:, part])
    pairs = [(out, want_out[:, part])] + [(g.grad, w.grad[:, part]) for g, w in zip(local, full)]
    return max((g - w).abs().max().item() for g, w in pairs)


def whole_sequence_logits(mode: str, layout: str, ulysses: int = 0) -> tuple[float, float]:
    """A tiny LLM made context-parallel by its real parallelize (cp = world, FSDP over it): max abs
    error of gather_sequence's logits (each rank's part of the output, gathered) against the same weights on one device, and (negative
    control) of the gathered parts left in rank order instead of sequence order."""
    from models.llm.model import LLMConfig, Transformer
    from models.llm.parallelize import PLAN
    from parallel.context.apply import gather_sequence
    from parallel.init import init_parameters
    from parallel.mesh import ParallelDims
    from parallel.options import ParallelizeOptions
    from parallel.parallelize import parallelize

    cp = dist.get_world_size()
    dims = ParallelDims.resolve(dp_shard=1, cp=cp, world_size=cp)
    meshes = dims.build_mesh("cpu")
    cfg = LLMConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16)
    with torch.device("meta"):
        model = Transformer(cfg)
    options = ParallelizeOptions(cp_mode=mode, cp_layout=layout, cp_ulysses=ulysses, cp_kernel="math")
    model = parallelize(model, PLAN, dims, meshes, options)
    model.to_empty(device="cpu")
    init_parameters(model, seed=11)
    reference = Transformer(cfg)
    init_parameters(reference, seed=11)
    tokens = torch.randint(0, 64, (2, 8 * cp), generator=torch.Generator().manual_seed(5))
    sequence_layout = _layout(mode, layout, cp, (cp // ulysses, ulysses) if mode == "hybrid" else None)
    with torch.no_grad():
        want = reference(tokens)
        local = model(sequence_layout.shard(tokens, meshes.cp.get_local_rank())).contiguous()
        got = gather_sequence(local, sequence_layout, meshes.cp.get_group())
        parts = [torch.empty_like(local) for _ in range(cp)]
        dist.all_gather(parts, local, group=meshes.cp.get_group())
    return (got - want).abs().max().item(), (torch.cat(parts, 1) - want).abs().max().item()


# ---- the tests ----

ERROR_CASES = {
    "ulysses_heads": "query heads on this rank (7) divisible by the ulysses size (4)",
    "zigzag_odd_local_length": "sequence length (12) divisible by 2 x cp = 8",
    "hybrid_wants_a_mesh": "takes a 2-D DeviceMesh",
    "hybrid_mesh_dims": "needs a 2-D DeviceMesh with dims ('cp_ring', 'cp_ulysses')",
}


def _checks(nproc: int) -> dict[str, tuple[str, dict]]:
    """check id -> (target, kwargs), everything the world of nproc ranks runs."""
    checks = {case_id(case): (f"{THIS}:parity", case) for case in PARITY[nproc]}
    for mode in MODULE_MODES[nproc]:
        shape = (2, 2) if mode == "hybrid" else None
        checks[f"module-{mode}"] = (f"{THIS}:parity", dict(
            mode=mode, layout="contiguous" if nproc == 3 else "zigzag", cp=nproc, shape=shape, kernel="math",
            dtype="float64", heads=(8, 2), causal=True, via_module=True))
        if nproc != 3:
            checks[f"bitwise-{mode}"] = (f"{THIS}:bitwise_repeatable", dict(mode=mode, cp=nproc, shape=shape))
    if nproc != 3:
        # negative control: zigzag attention over contiguously sharded data must not pass
        checks["wrong-layout"] = (f"{THIS}:parity", dict(mode="ring", layout="zigzag", cp=nproc, shape=None,
                                                         kernel="math", dtype="float64", heads=(8, 8), causal=True,
                                                         shard_layout="contiguous"))
    checks.update({document_case_id(case): (f"{THIS}:document_parity", case)
                   for n, case in DOCUMENT_CASES if n == nproc})
    if nproc in DOCUMENT_MODES:  # negative control: the same documents, attention left plain causal
        checks["documents-ignored"] = (f"{THIS}:document_parity", dict(
            mode="ring", layout="zigzag", cp=nproc, shape=None, kernel="math", dtype="float64", pattern="spanning",
            without_documents=True))
    checks["mixer"] = (f"{THIS}:mixer_parity", {})
    if nproc != 3:
        checks["whole-sequence"] = (f"{THIS}:whole_sequence_logits", dict(mode="ring", layout="zigzag"))
    if nproc == 4:
        checks["whole-sequence-hybrid"] = (f"{THIS}:whole_sequence_logits",
                                           dict(mode="hybrid", layout="zigzag", ulysses=2))
    if nproc > 2:  # with one earlier rank, summing its state is folding it
        checks["mixer-summed"] = (f"{THIS}:mixer_parity", {"summed_states": True})
    if nproc == 4:
        checks.update({f"error-{case}": (f"{THIS}:error_message", {"case": case}) for case in ERROR_CASES})
    return checks


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """world(nproc)[check id] -> that check's per-rank values; each world is started once, on first use."""
    root = tmp_path_factory.mktemp("context-parallel")

    @functools.cache
    def world(nproc: int) -> dict[str, list]:
        checks = _checks(nproc)
        results = run_world(nproc, list(checks.values()), Path(root) / f"world{nproc}", timeout_s=300,
                            collective_timeout_s=60)
        return {check_id: _ResultOnAllRanks(result, nproc) for check_id, result in zip(checks, results)}
    return world


class _ResultOnAllRanks:
    def __init__(self, result: CheckResult, nproc: int):
        self.result, self.nproc = result, nproc

    def values(self) -> list:
        """Every rank's value, failing with the first failed rank's traceback."""
        return [self.result.value(rank) for rank in range(self.nproc)]


ALL_PARITY = [(nproc, case) for nproc, cases in PARITY.items() for case in cases]


@pytest.mark.parametrize("nproc, case", ALL_PARITY, ids=[case_id(c) for _, c in ALL_PARITY])
def test_matches_full_attention(worlds, nproc, case):
    for rank, errors in enumerate(worlds(nproc)[case_id(case)].values()):
        assert set(errors) == {"out", "lse", "dq", "dk", "dv"}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOLERANCE[case["dtype"]], f"rank {rank}: {worst} off by {errors[worst]:.2e}"


@pytest.mark.parametrize("nproc, case", DOCUMENT_CASES, ids=[document_case_id(c) for _, c in DOCUMENT_CASES])
def test_packed_documents_match_masked_full_attention(worlds, nproc, case):
    for rank, errors in enumerate(worlds(nproc)[document_case_id(case)].values()):
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOLERANCE[case["dtype"]], f"rank {rank}: {worst} off by {errors[worst]:.2e}"


@pytest.mark.parametrize("nproc", DOCUMENT_MODES)
def test_ignoring_the_documents_is_caught(worlds, nproc):
    assert max(max(errors.values()) for errors in worlds(nproc)["documents-ignored"].values()) > 1e-2


@pytest.mark.parametrize("nproc, mode", [(n, m) for n, modes in MODULE_MODES.items() for m in modes])
def test_module_matches_full_attention(worlds, nproc, mode):
    for errors in worlds(nproc)[f"module-{mode}"].values():
        assert set(errors) == {"out", "dq", "dk", "dv"} and max(errors.values()) <= 1e-10


@pytest.mark.parametrize("nproc, mode", [(n, m) for n, modes in MODULE_MODES.items() if n != 3 for m in modes])
def test_bitwise_repeatable(worlds, nproc, mode):
    assert all(worlds(nproc)[f"bitwise-{mode}"].values())


@pytest.mark.parametrize("nproc", [2, 4])
def test_wrong_layout_is_caught(worlds, nproc):
    assert max(max(errors.values()) for errors in worlds(nproc)["wrong-layout"].values()) > 1e-2


@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_state_passing_mixer_matches_whole_sequence(worlds, nproc):
    assert max(worlds(nproc)["mixer"].values()) <= 1e-10


@pytest.mark.parametrize("nproc", [3, 4])
def test_summing_states_instead_of_folding_is_caught(worlds, nproc):
    assert max(worlds(nproc)["mixer-summed"].values()) > 1e-2


@pytest.mark.parametrize("case", ERROR_CASES)
def test_misuse_is_one_clear_error(worlds, case):
    for message in worlds(4)[f"error-{case}"].values():
        assert ERROR_CASES[case] in message, message


@pytest.mark.parametrize("nproc, check", [(2, "whole-sequence"), (4, "whole-sequence"), (4, "whole-sequence-hybrid")])
def test_whole_sequence_output_of_a_cp_model_matches_one_device(worlds, nproc, check):
    """What greedy sampling under cp runs: every rank ends with the one-device logits."""
    for error, error_in_rank_order in worlds(nproc)[check].values():
        assert error < 1e-5, error
        assert error_in_rank_order > 1e-2  # the gather alone is not enough: the parts need reordering
