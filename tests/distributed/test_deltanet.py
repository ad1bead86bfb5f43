"""DeltaNet sharded: TP by heads and CP by state passing (with the short convs' halo) against one
device at the layer level (packed documents too: state maps cut at boundaries, the halo kept inside
documents), the hybrid stack of configs/deltanet/hybrid-tiny.yaml (DeltaNet and softmax-attention
layers on one contiguous layout) under cp 2 and 4 against one device at the model level (fp64, with
packed documents too), and configs/deltanet/tiny.yaml at tp=2, cp=2 and pp=2 against one process at
the run level (fp32, relative 1e-5); dp_shard=2 (FSDP) too, the hybrid config at cp=2, and tiny.yaml
with document masks at cp=2."""
import copy
from pathlib import Path

import pytest
from torch.distributed.tensor import Replicate, Shard

from tests.conftest import REPO
from tests.distributed.harness import run_world
from tests.distributed.runs import (SAMPLE, assert_losses_differ, assert_same_losses, assert_sharded_over, perturbed_lr,
                                    train_check)
from tests.distributed.sharding import assert_placed, llm_plan

THIS = "tests.distributed.test_deltanet"
TINY = REPO / "configs" / "deltanet" / "tiny.yaml"
HYBRID = REPO / "configs" / "deltanet" / "hybrid-tiny.yaml"


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tp_parity(use_gate: bool, sequence_parallel: bool, hybrid: bool, perturb: float = 0.0) -> dict:
    """Check body: the DeltaNet model TP'd over the world vs one device (fp32). Returns "errors": of
    logits, loss and every parameter gradient (max relative error); and "placements": each
    parameter's (mesh dim names, placements) if it is a DTensor, else None. `perturb` is the negative
    control: the last tp rank's shard of layer 0's q_conv scaled by 1 + perturb after sharding."""
    import torch.distributed as dist

    from models.deltanet.model import DeltaNet, DeltaNetConfig
    from models.deltanet.parallelize import apply_tensor_parallel
    from parallel.options import ParallelizeOptions
    from parallel.init import init_parameters
    from parallel.mesh import ParallelDims
    from tests.distributed.sharding import model_parity_errors, placements, scale_last_shard

    tp = dist.get_world_size()
    cfg = DeltaNetConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16,
                         use_gate=use_gate, allow_neg_eigval=use_gate, chunk_size=8,
                         attention_layers=[1] if hybrid else [])
    reference = DeltaNet(cfg)
    init_parameters(reference, seed=3)
    sharded = copy.deepcopy(reference)
    meshes = ParallelDims.resolve(tp=tp, dp_shard=1, world_size=tp).build_mesh("cpu")
    apply_tensor_parallel(sharded, meshes, ParallelizeOptions(sequence_parallel=sequence_parallel))
    if perturb:
        scale_last_shard(sharded.layers["0"].attention.q_conv.weight, 1 + perturb)
    errors = model_parity_errors(reference, sharded, cfg.vocab_size, seq_len=20)
    assert any("conv" in k for k in errors) and any("b_proj" in k for k in errors)
    return {"errors": errors, "placements": placements(sharded)}


def packed_document_ids(T: int):
    """Two rows of T = 6 * world tokens. Row 0 starts documents at T/4 and T/2 (rank edges at cp 4 and
    2), at T/2 + 1 (inside the next rank's conv halo) and at T - 2; row 1 at 1 and T - 3, so its
    second document's state passes through every rank edge before a boundary cuts the last chunk."""
    import torch

    ids = torch.zeros(2, T, dtype=torch.long)
    for row, starts in enumerate(((T // 4, T // 2, T // 2 + 1, T - 2), (1, T - 3))):
        for t in starts:
            ids[row, t:] += 1
    return ids


def document_positions(ids):
    """Positions restarting at 0 at each document of ids [B, T] (what batches carry with documents)."""
    import torch

    T = ids.shape[1]
    starts = torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), ids[:, 1:] != ids[:, :-1]], dim=1)
    return torch.arange(T) - torch.cummax(torch.where(starts, torch.arange(T), 0), dim=1).values


def cp_parity(dtype: str, backend: str, rule: str = "delta", sum_states: bool = False,
              documents: str | None = None) -> dict[str, float]:
    """Check body: one DeltaNet layer (convs, gate, negative eigenvalues; with rule="linear" plain
    linear attention instead of the delta rule) with the sequence split contiguously over the world,
    state passing + conv halo, vs the whole sequence on one device: output, input gradient and every
    parameter gradient (max abs error). `sum_states` is the negative control: ranks start from the sum
    of the earlier ranks' S_ext (LASP-2's linear-attention shortcut). `documents`: "packed" runs both
    with `packed_document_ids` (each rank gets its chunk of them); "edge_missed" is its negative
    control, the state passing told that every rank continues the previous rank's document."""
    import torch
    import torch.distributed as dist

    from models.deltanet.model import DeltaNetConfig, DeltaNetLayer
    from models.deltanet.parallelize import StatePassingMixerRule
    from parallel.context.halo import previous_halo

    world, rank = dist.get_world_size(), dist.get_rank()
    dt = {"fp64": torch.float64, "fp32": torch.float32}[dtype]
    cfg = DeltaNetConfig(dim=32, n_heads=2, use_gate=True, allow_neg_eigval=rule == "delta", chunk_size=4,
                         backend=backend, mixer_rule=rule)
    reference = DeltaNetLayer(cfg).to(dt)
    for index, (name, p) in enumerate(reference.named_parameters()):
        with torch.no_grad():
            g = torch.Generator().manual_seed(index)
            if name.endswith("conv.weight"):
                p.uniform_(-0.5, 0.5, generator=g)
            else:
                p.normal_(0, 0.3 if "norm" not in name else 0.1, generator=g).add_(1 if "norm" in name else 0)
    layer = copy.deepcopy(reference)
    group = dist.group.WORLD
    layer.core_mixer = StatePassingMixerRule(group, rule, backend, cfg.chunk_size)
    if sum_states:  # fold replaced by a sum of the earlier ranks' S_ext: wrong for the delta rule
        from parallel.context.mixer import _IncomingState

        def summed(transition, state, group):
            return _IncomingState.apply(torch.cat([torch.eye(transition.shape[-1], dtype=transition.dtype)
                                                   .expand_as(transition), state], -1), transition.shape[-1], group)
        import parallel.context.mixer as mixer_module
        original = mixer_module.incoming_state
        mixer_module.incoming_state = summed
    if documents == "edge_missed":  # the previous rank's last id read as this rank's first one
        import parallel.context.mixer as mixer_module
        original_halo = mixer_module.previous_halo
        mixer_module.previous_halo = lambda x, n, group: x[:, :n]
    for conv in (layer.q_conv, layer.k_conv, layer.v_conv):
        conv.halo = lambda x, conv=conv: previous_halo(x, conv.kernel_size - 1, group)
    T = 6 * world  # several chunks of 4 per rank for cp 2, partial chunks for cp 4
    x = torch.randn(2, T, cfg.dim, dtype=dt, generator=torch.Generator().manual_seed(1), requires_grad=True)
    dout = torch.randn(2, T, cfg.dim, dtype=dt, generator=torch.Generator().manual_seed(2))
    ids = packed_document_ids(T) if documents else None
    want = reference(x, document_ids=ids)
    want.backward(dout)
    lo, hi = rank * T // world, (rank + 1) * T // world
    x_local = x.detach()[:, lo:hi].clone().requires_grad_(True)
    try:
        got = layer(x_local, document_ids=None if ids is None else ids[:, lo:hi])
        got.backward(dout[:, lo:hi])
    finally:
        if sum_states:
            mixer_module.incoming_state = original
        if documents == "edge_missed":
            mixer_module.previous_halo = original_halo
    pairs = {"out": (got, want[:, lo:hi]), "dx": (x_local.grad, x.grad[:, lo:hi])}
    ref_params = dict(reference.named_parameters())
    for name, p in layer.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)  # each rank holds its tokens' share of the gradient
        pairs[f"grad:{name}"] = (grad, ref_params[name].grad)
    errors = {}
    for k, (a, b) in pairs.items():  # max abs error, and relative to the reference's largest entry
        errors[f"abs:{k}"] = torch.tensor((a - b).abs().max().item())
        errors[f"rel:{k}"] = torch.tensor(_rel(a, b))
    for v in errors.values():
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return {k: v.item() for k, v in errors.items()}


def hybrid_cp_parity(cp_mode: str, token_layout: str | None = None, documents: bool = False) -> dict[str, float]:
    """Check body: the model of configs/deltanet/hybrid-tiny.yaml (DeltaNet layers 0 and 2, softmax
    attention at 1 and 3), with a small vocabulary, chunk 4 (several and partial chunks per rank),
    init std 0.1 (so attention is not near-uniform) in fp64, made context-parallel over the world as
    the trainer does it — `apply_context_parallel_deltanet` with the config's parallel options (its
    contiguous layout) and the batch cut by `launcher.config.cp_layout` — vs the whole sequence on
    one device: logits and every parameter gradient (summed over cp), max abs and relative error.
    `token_layout` is the negative control: the tokens cut by another layout than the model's.
    `documents`: rows packed with `packed_document_ids(24)` and their per-document positions, cut
    like the tokens."""
    import torch
    import torch.distributed as dist

    from launcher.config import cp_layout, load_config
    from models.deltanet.model import DeltaNet
    from models.deltanet.parallelize import StatePassingMixerRule, apply_context_parallel_deltanet
    from parallel.options import ParallelizeOptions
    from parallel.context.layout import SequenceLayout
    from parallel.context.module import ContextParallelAttention
    from parallel.init import init_parameters
    from parallel.mesh import ParallelDims

    world = dist.get_world_size()
    ulysses = {"ring": 0, "ulysses": 0, "hybrid": 2}[cp_mode]
    cfg = load_config(HYBRID, ["model.vocab_size=64", "model.chunk_size=4", "model.init_std=0.1",
                               f"parallel.cp={world}", f"parallel.cp_mode={cp_mode}", f"parallel.cp_ulysses={ulysses}"])
    p = cfg.parallel
    reference = DeltaNet(cfg.model_config())
    init_parameters(reference, seed=5)
    reference.double()
    model = copy.deepcopy(reference)
    dims = ParallelDims.resolve(cp=world, dp_shard=1, world_size=world)
    meshes = dims.build_mesh("cpu")
    apply_context_parallel_deltanet(model, meshes, ParallelizeOptions(
        cp_mode=p.cp_mode, cp_layout=p.cp_layout, cp_ulysses=p.cp_ulysses, cp_kernel=p.cp_kernel))
    mixers = [type(block.attention.core_mixer if hasattr(block.attention, "core_mixer")
                   else block.attention.core_attention) for block in model.layers.values()]
    assert mixers == [StatePassingMixerRule, ContextParallelAttention] * 2, mixers

    layout, cp_rank = cp_layout(p, dims.cp), meshes.cp.get_local_rank()
    if token_layout is not None:
        layout = SequenceLayout(token_layout, layout.ring_size, layout.ulysses_size)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 24), generator=generator)
    dlogits = torch.randn(2, 24, 64, generator=generator, dtype=torch.float64)
    ids = packed_document_ids(24) if documents else None
    positions = document_positions(ids) if documents else None
    want = reference(tokens, positions, document_ids=ids)
    want.backward(dlogits)
    if documents:
        got = model(layout.shard(tokens, cp_rank), layout.shard(positions, cp_rank),
                    document_ids=layout.shard(ids, cp_rank))
    else:
        got = model(layout.shard(tokens, cp_rank))
    got.backward(layout.shard(dlogits, cp_rank))

    pairs = {"logits": (got, layout.shard(want.detach(), cp_rank))}
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)  # each rank holds its tokens' share of the gradient
        pairs[f"grad:{name}"] = (grad, ref_params[name].grad)
    errors = {}
    for key, (a, b) in pairs.items():
        errors[f"abs:{key}"] = torch.tensor((a - b).abs().max().item())
        errors[f"rel:{key}"] = torch.tensor(_rel(a, b))
    for value in errors.values():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return {k: v.item() for k, v in errors.items()}


CP_CHECKS = [(f"{THIS}:cp_parity", {"dtype": d, "backend": b}) for d, b in
             (("fp64", "recurrent"), ("fp64", "chunked"), ("fp32", "chunked"))]
CP_CHECKS.append((f"{THIS}:cp_parity", {"dtype": "fp64", "backend": "chunked", "rule": "linear"}))
# Packed documents: boundaries at rank edges, inside a rank's chunk and inside the conv halo.
CP_CHECKS += [(f"{THIS}:cp_parity", {"dtype": "fp64", "backend": b, "rule": r, "documents": "packed"})
              for b, r in (("recurrent", "delta"), ("chunked", "delta"), ("chunked", "linear"))]
HYBRID_CP_MODES = {2: ["ring", "ulysses"], 4: ["ring", "ulysses", "hybrid"]}
HYBRID_CP_CHECKS = {cp: [(f"{THIS}:hybrid_cp_parity", {"cp_mode": mode}) for mode in modes]
                    for cp, modes in HYBRID_CP_MODES.items()}
HYBRID_NEGATIVE = (f"{THIS}:hybrid_cp_parity", {"cp_mode": "ring", "token_layout": "zigzag"})
# The hybrid stack with packed documents: ring attention at cp 2, Ulysses x ring 2x2 at cp 4.
HYBRID_DOCUMENTS = {2: (f"{THIS}:hybrid_cp_parity", {"cp_mode": "ring", "documents": True}),
                    4: (f"{THIS}:hybrid_cp_parity", {"cp_mode": "hybrid", "documents": True})}
NEGATIVE = (f"{THIS}:cp_parity", {"dtype": "fp64", "backend": "chunked", "sum_states": True})
DOCUMENTS_NEGATIVE = (f"{THIS}:cp_parity", {"dtype": "fp64", "backend": "chunked", "documents": "edge_missed"})
TP_CHECKS = [(f"{THIS}:tp_parity", {"use_gate": g, "sequence_parallel": sp, "hybrid": h})
             for g, sp, h in ((False, True, False), (True, False, False), (True, True, True))]
# Negative control: one rank's shard of layer 0's q_conv off by 3e-5 (relative), the smallest step of
# 1e-5, 2e-5, 3e-5 that the TP tolerance rejects with a margin (1e-5 gave 9.7e-6).
TP_PERTURBED = (f"{THIS}:tp_parity", {"use_gate": False, "sequence_parallel": True, "hybrid": False, "perturb": 3e-5})
TP_TOL = 1e-5
# A DeltaNet layer's TP plan (parallelize.py) by module name: projections and the short convs split by
# heads (channels), o_proj by its input features, the per-head output norm's one gain replicated.
MIXER_PLAN = {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "b_proj", "g_proj", "q_conv", "k_conv", "v_conv"),
                              Shard(0)), "o_proj": Shard(1), "o_norm": Replicate()}
CP_TOL = {"fp64": 1e-10, "fp32": 1e-5}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deltanet")


@pytest.fixture(scope="module")
def two(runs_dir, data_cache):
    # cp2 and pp2 also sample: the prompt goes through the halo of the short convs and through the pipeline.
    runs = {"dp2": ["train.micro_batch_size=4"], "tp2": ["parallel.tp=2"], "cp2": ["parallel.cp=2", *SAMPLE],
            "cp2_lr_perturbed": ["parallel.cp=2", perturbed_lr(TINY)],
            "cp2_documents": ["parallel.cp=2", "data.document_mask=true"],
            "pp2": ["parallel.pp=2", "train.micro_batch_size=4", *SAMPLE]}
    checks = TP_CHECKS + [TP_PERTURBED] + CP_CHECKS + HYBRID_CP_CHECKS[2] + [HYBRID_DOCUMENTS[2]] + [
        train_check(runs_dir / name, data_cache, *o, config=TINY, summary=True) for name, o in runs.items()]
    runs["hybrid_cp2"] = None  # ring attention and state passing on one contiguous layout
    checks.append(train_check(runs_dir / "hybrid_cp2", data_cache, "parallel.cp=2", config=HYBRID))
    results = iter(r.value() for r in run_world(2, checks, runs_dir / "world2"))
    return {"tp": [next(results) for _ in TP_CHECKS], "tp_perturbed": next(results),
            "cp": [next(results) for _ in CP_CHECKS], "hybrid": [next(results) for _ in HYBRID_CP_CHECKS[2]],
            "hybrid_documents": next(results), "runs": dict(zip(runs, results))}


@pytest.fixture(scope="module")
def four(runs_dir, two):
    results = iter(r.value() for r in run_world(4, CP_CHECKS + [NEGATIVE, DOCUMENTS_NEGATIVE] + HYBRID_CP_CHECKS[4]
                                                + [HYBRID_NEGATIVE, HYBRID_DOCUMENTS[4]], runs_dir / "world4"))
    return {"cp": [next(results) for _ in CP_CHECKS], "negative": next(results), "documents_negative": next(results),
            "hybrid": [next(results) for _ in HYBRID_CP_CHECKS[4]], "hybrid_negative": next(results),
            "hybrid_documents": next(results)}


def one_process_checks(workdir: Path, cache: Path) -> dict:
    return {"tiny": train_check(workdir / "one", cache, *SAMPLE, config=TINY, summary=True),
            "hybrid": train_check(workdir / "hybrid_one", cache, config=HYBRID),
            "tiny_documents": train_check(workdir / "one_documents", cache, "data.document_mask=true", config=TINY)}


@pytest.fixture(scope="module")
def one(one_process):
    return {name: one_process[f"test_deltanet:{name}"].value() for name in ("tiny", "hybrid", "tiny_documents")}


def _beyond_tp_tolerance(errors: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in errors.items() if not v <= TP_TOL}


@pytest.mark.parametrize("case", range(len(TP_CHECKS)))
def test_tp2_matches_one_device(two, case):
    """DeltaNet with TP=2 (plain; gated with negative eigenvalues, no SP; hybrid with SP): logits,
    loss and every parameter gradient, conv weights included (fp32, relative 1e-5); every parameter
    sharded as the plan says."""
    result = two["tp"][case]
    assert not _beyond_tp_tolerance(result["errors"])
    tp_case = TP_CHECKS[case][1]
    assert_placed(result["placements"], {**llm_plan(2, 2, tp_case["sequence_parallel"]), **MIXER_PLAN})


def test_tp2_negative_control(two):
    """Layer 0's q_conv off by 3e-5 on one rank's shard: the conv's gradient is off by as much, and
    the same tolerance rejects it."""
    bad = _beyond_tp_tolerance(two["tp_perturbed"]["errors"])
    assert "grad:layers.0.attention.q_conv.weight" in bad, two["tp_perturbed"]["errors"]


def _assert_cp(errors: dict, dtype: str):
    """fp64: max abs error <= 1e-10; fp32: max error relative to the reference's largest entry <= 1e-5."""
    kind = "abs:" if dtype == "fp64" else "rel:"
    bad = {k: v for k, v in errors.items() if k.startswith(kind) and not v <= CP_TOL[dtype]}
    assert not bad, bad


@pytest.mark.parametrize("case", range(len(CP_CHECKS)))
def test_cp2_state_passing_matches_one_device(two, case):
    _assert_cp(two["cp"][case], CP_CHECKS[case][1]["dtype"])


@pytest.mark.parametrize("case", range(len(CP_CHECKS)))
def test_cp4_state_passing_matches_one_device(four, case):
    _assert_cp(four["cp"][case], CP_CHECKS[case][1]["dtype"])


def test_summed_states_negative_control(four):
    """Summing the earlier ranks' S_ext instead of folding the maps is wrong from rank 2 on (at cp=2
    the fold from zero is the sum), so the same cp=4 test fails by far."""
    assert four["negative"]["abs:out"] > 1e-3


def test_documents_missed_at_rank_edges_negative_control(four):
    """Packed documents at cp=4 with the state passing blind to documents that start at a rank's first
    token (it takes the previous rank's state there): far off."""
    assert four["documents_negative"]["abs:out"] > 1e-3


@pytest.mark.parametrize("cp,mode", [(cp, mode) for cp, modes in HYBRID_CP_MODES.items() for mode in modes])
def test_hybrid_stack_cp_matches_one_device(two, four, cp, mode):
    """The hybrid model (DeltaNet + softmax layers, one contiguous layout) split over cp ranks: logits
    and every parameter gradient equal the whole sequence on one device (fp64, max abs 1e-10)."""
    errors = (two if cp == 2 else four)["hybrid"][HYBRID_CP_MODES[cp].index(mode)]
    assert any(k.startswith("abs:grad:") and "conv" in k for k in errors)
    assert any(k.startswith("abs:grad:") and ".wq." in k for k in errors)
    _assert_cp(errors, "fp64")


@pytest.mark.parametrize("cp", [2, 4])
def test_hybrid_stack_with_documents_cp_matches_one_device(two, four, cp):
    """The hybrid stack on rows of packed documents (boundaries at rank edges, inside chunks, in the
    conv halo), per-document positions: cp 2 ring and cp 4 Ulysses x ring against one device (fp64)."""
    _assert_cp((two if cp == 2 else four)["hybrid_documents"], "fp64")


def test_hybrid_stack_on_the_wrong_layout_negative_control(four):
    """The same cp=4 check with the tokens cut zigzag while the model runs the contiguous layout: far off."""
    assert four["hybrid_negative"]["rel:logits"] > 1e-2


@pytest.mark.parametrize("run", ["dp2", "tp2", "cp2", "pp2"])
def test_tiny_run_matches_one_process(two, one, run):
    assert_same_losses(two["runs"][run]["losses"], one["tiny"]["losses"])


def test_tp2_run_is_sharded_over_tp(two):
    assert_sharded_over(two["runs"]["tp2"]["layout"], "tp")


@pytest.mark.parametrize("run", ["cp2", "pp2"])
def test_greedy_sample_matches_one_process(two, one, run):
    sample = two["runs"][run]["sample"]
    assert sample and sample.startswith("The with statement") and sample == one["tiny"]["sample"]


def test_perturbed_run_fails_the_comparison(two, one):
    """Negative control: cp=2 with the learning rate off by LR_PERTURBATION does not match."""
    assert_losses_differ(two["runs"]["cp2_lr_perturbed"]["losses"], one["tiny"]["losses"])


def test_documents_cp2_run_matches_one_process(two, one):
    """configs/deltanet/tiny.yaml with data.document_mask=true (state, convs, halo and state passing
    reset at documents) at cp=2 gives the one-process losses with the same masks; control: those
    differ from the unmasked run's, so the batches' documents reach the model."""
    assert_same_losses(two["runs"]["cp2_documents"]["losses"], one["tiny_documents"])
    assert_losses_differ(one["tiny_documents"], one["tiny"]["losses"])


def test_hybrid_cp2_run_matches_one_process(two, one):
    """configs/deltanet/hybrid-tiny.yaml (softmax attention at layers 1 and 3) at cp=2, contiguous."""
    assert_same_losses(two["runs"]["hybrid_cp2"], one["hybrid"])
