"""flops_per_token of the MoE and DeltaNet families against torch's FlopCounterMode (the LLM's: test_model.py).

Model FLOPs, as the LLM's count: 2 per multiply-add, the backward 2x the forward, and softmax attention
causal, i.e. (T+1)/(2T) of the T x T square the math SDPA backend computes. What the counter does not
see is added from the op's shapes, each with its reason.
"""
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.deltanet.model import DeltaNet, DeltaNetConfig, ShortConvolution, mixer_rule_flops
from models.deltanet.model import flops_per_token as deltanet_flops_per_token
from models.moe.model import MoEConfig, MoETransformer
from models.moe.model import flops_per_token as moe_flops_per_token
from parallel.init import init_parameters

aten = torch.ops.aten
VOCAB = 64


def _tokens(seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0))


def _linear_weights(model: nn.Module) -> int:
    """Weights that take part in a matmul per token: every nn.Linear (the embedding lookup is free)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _causal(square: int, seq: int) -> Fraction:
    """The causal part of attention counted over the full square: query t sees t + 1 of the T keys."""
    causal = Fraction(square) * Fraction(seq + 1, 2 * seq)
    assert causal.denominator == 1
    return causal


def _per_token(measured: Fraction, seq: int):
    """A float per-token formula's expectation: measured / seq, exact up to the float's rounding (a
    mixer count per token like X / 13 is not representable)."""
    return pytest.approx(float(measured / seq), rel=1e-12, abs=0)


def _in_modules(by_module: dict, suffix: str, op) -> int:
    """The forward FLOPs of `op` summed over the modules whose name ends with `suffix`."""
    return sum(counts.get(op, 0) for name, counts in by_module.items() if name.endswith(suffix))


def _measure(model: nn.Module, seq: int, **counter_kwargs) -> tuple[dict, dict]:
    """(forward FLOPs per module and "Global", backward FLOPs) of one forward+backward on the math SDPA
    backend. Separate counters: the module attribution only holds for the forward."""
    forward = FlopCounterMode(display=False, **counter_kwargs)
    backward = FlopCounterMode(display=False, **counter_kwargs)
    with sdpa_kernel(SDPBackend.MATH):
        with forward:
            out = model(_tokens(seq)).sum()
        with backward:
            out.backward()
    return forward.get_flop_counts(), backward.get_flop_counts()["Global"]


# ------------------------------------------------------------------------------------------ MoE


MOE_CONFIGS = [
    # A dense first layer, fine-grained routed experts and a shared one, GQA.
    MoEConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16, n_experts=4, top_k=2,
              moe_hidden_dim=24, n_shared_experts=1, n_dense_layers=1),
    # Every layer MoE, experts of the dense FFN's width (moe_hidden_dim 0), sigmoid router, tied output.
    MoEConfig(dim=32, n_layers=2, n_heads=4, vocab_size=VOCAB, multiple_of=16, n_experts=6, top_k=3,
              router="sigmoid", tie_embeddings=True),
]


@pytest.mark.parametrize("cfg, seq", [(MOE_CONFIGS[0], 10), (MOE_CONFIGS[0], 7), (MOE_CONFIGS[1], 9)],
                         ids=["shared-dense-10", "shared-dense-7", "sigmoid-tied-9"])
def test_moe_flops_per_token_is_exact(cfg, seq):
    # The model's own CPU expert path (one mm per expert on its rows, no padding) multiplies each routed
    # (token, expert) pair once, so the counter sees exactly the routed work.
    model = MoETransformer(cfg)
    init_parameters(model, 0)
    by_module, backward = _measure(model, seq)
    forward = by_module["Global"]
    assert set(forward) == set(backward) == {aten.mm, aten.bmm}, forward
    # Every matmul here takes both gradients (input and weight): the backward is 2x the forward.
    assert backward == {op: 2 * flops for op, flops in forward.items()}

    # Routed: top_k (token, expert) pairs per token through one expert's w1, w3, w2. Everything else that
    # multiplies (attention and dense FFN projections, routers d x E, shared experts, output) is nn.Linear.
    moe_layers = model.moe_layers().values()
    expert_weights = [sum(w.numel() for w in m.experts.local_weights()) // cfg.n_experts for m in moe_layers]
    assert len(expert_weights) == cfg.n_moe_layers
    assert _in_modules(by_module, ".experts", aten.mm) == 2 * seq * cfg.top_k * sum(expert_weights)
    assert forward[aten.mm] == 2 * seq * (_linear_weights(model) + cfg.top_k * sum(expert_weights))

    attention = _in_modules(by_module, ".core_attention", aten.bmm)
    assert forward[aten.bmm] == attention
    model_flops = 3 * (forward[aten.mm] + _causal(attention, seq))
    assert Fraction(moe_flops_per_token(cfg, seq)) * seq == model_flops


# ------------------------------------------------------------------------------------------ DeltaNet


def _unit_triangular_solve_flops(a_shape, b_shape, *, upper, left=True, unitriangular=False, out_shape=None) -> int:
    """linalg_solve_triangular is not in FlopCounterMode's registry. The chunked delta rule solves
    (I + A) X = B with the unit diagonal implied (unitriangular=True), so forward (or, in the backward,
    back) substitution does one multiply-add per off-diagonal entry of the n x n triangle and right-hand
    side column: n (n - 1) / 2, 2 FLOPs each as the counter counts a matmul's."""
    assert left and unitriangular, "only the chunked delta rule's solve is counted here"
    n = a_shape[-1]
    return b_shape.numel() // n * n * (n - 1)


SOLVE = {aten.linalg_solve_triangular: _unit_triangular_solve_flops}
MIXER_OPS = (aten.bmm, aten.baddbmm, aten.linalg_solve_triangular)
def _deltanet(**changes) -> DeltaNet:
    cfg = DeltaNetConfig(dim=16, n_layers=2, n_heads=2, vocab_size=VOCAB, multiple_of=16, chunk_size=8,
                         backend="chunked", **changes)
    model = DeltaNet(cfg).double()
    init_parameters(model, 0)
    return model


# chunk_size 8: 16 tokens are two whole chunks, 13 a whole and a padded one, 4 one short chunk (C = T).
# Each case: (id, config changes, tokens).
DELTANET_CASES = [
    ("delta-16", dict(mixer_rule="delta"), 16),
    ("delta-gate-13", dict(mixer_rule="delta", use_gate=True, allow_neg_eigval=True), 13),
    ("delta-conv2-4", dict(mixer_rule="delta", conv_size=2), 4),
    ("delta-hybrid-16", dict(mixer_rule="delta", use_gate=True, n_kv_heads=1, attention_layers=[1]), 16),
    ("linear-16", dict(mixer_rule="linear"), 16),
    ("linear-gate-13", dict(mixer_rule="linear", use_gate=True), 13),
    ("linear-hybrid-16", dict(mixer_rule="linear", n_kv_heads=1, attention_layers=[0]), 16),
]


def _mixer_flops(by_module: dict) -> int:
    return sum(_in_modules(by_module, ".core_mixer", op) for op in MIXER_OPS)


@pytest.mark.parametrize("changes, seq", [pytest.param(changes, seq, id=case_id)
                                          for case_id, changes, seq in DELTANET_CASES])
def test_deltanet_flops_per_token_outside_the_mixer_rule_is_exact(changes, seq):
    """flops_per_token = the measured forward of everything but the mixer rule, plus H mixer_rule_flops
    per DeltaNet layer and token, all x3. mixer_rule_flops is measured on its own (next test), so an
    error there does not hide one in the rest (projections, beta, gate, convs, hybrid attention)."""
    model = _deltanet(**changes)
    cfg = model.cfg
    by_module, _ = _measure(model, seq, custom_mapping=SOLVE)
    forward = by_module["Global"]
    assert set(forward) <= {aten.mm, *MIXER_OPS}, forward
    assert forward[aten.mm] == 2 * seq * _linear_weights(model)
    attention = _in_modules(by_module, ".core_attention", aten.bmm)
    assert sum(forward.get(op, 0) for op in MIXER_OPS) == attention + _mixer_flops(by_module)
    # The short convs are K shifted elementwise multiply-adds per channel and token, ops the counter's
    # registry (matmuls, convolutions, attention kernels) does not include.
    convs = sum(2 * m.weight.numel() * seq for m in model.modules() if isinstance(m, ShortConvolution))

    n_deltanet = cfg.n_layers - len(cfg.attention_layers)
    mixer_rule = n_deltanet * cfg.n_heads * seq * Fraction(mixer_rule_flops(cfg, seq))
    model_flops = 3 * (forward[aten.mm] + _causal(attention, seq) + convs + mixer_rule)
    assert deltanet_flops_per_token(cfg, seq) == _per_token(model_flops, seq)


@pytest.mark.parametrize("changes, seq", [pytest.param(changes, seq, id=case_id)
                                          for case_id, changes, seq in DELTANET_CASES])
def test_deltanet_mixer_rule_flops_is_exact(changes, seq):
    """mixer_rule_flops against the chunked ops' forward as run: their bmms (the full C x C squares of the
    masked A and Q K^T included), the chunk scan's baddbmms and the triangular solve."""
    model = _deltanet(**changes)
    cfg = model.cfg
    by_module, _ = _measure(model, seq, custom_mapping=SOLVE)
    heads = (cfg.n_layers - len(cfg.attention_layers)) * cfg.n_heads
    assert mixer_rule_flops(cfg, seq) == _per_token(Fraction(_mixer_flops(by_module), heads), seq)


# Why flops_per_token is 3x the forward rather than the executed forward + backward: every matmul's
# backward is 2x its forward except in the delta rule's chunk scan and solve.


def test_deltanet_linear_rule_backward_is_twice_the_forward():
    model = _deltanet(mixer_rule="linear", attention_layers=[1])
    by_module, backward = _measure(model, 16)
    assert backward == {op: 2 * flops for op, flops in by_module["Global"].items()}


def test_deltanet_delta_rule_backward_is_twice_the_forward_but_for_the_scan_and_the_solve():
    seq = 16
    model = _deltanet(mixer_rule="delta", attention_layers=[1])
    cfg = model.cfg
    by_module, backward = _measure(model, seq, custom_mapping=SOLVE)
    forward = by_module["Global"]
    assert set(backward) == {aten.mm, aten.bmm, aten.linalg_solve_triangular}  # baddbmm goes back as bmms
    assert backward[aten.mm] == 2 * forward[aten.mm]
    C, D, n_chunks = cfg.chunk_size, cfg.head_dim, seq // cfg.chunk_size
    assert n_chunks >= 2
    heads = (cfg.n_layers - len(cfg.attention_layers)) * cfg.n_heads
    scan_step = 2 * D ** 3 * heads  # one M S of the scan S <- M S + E, every DeltaNet layer and head
    # The first step's incoming state is the zero initial state (no gradient: one of its two bmms), the
    # last step only makes the final state, which the output does not use (no backward at all).
    skipped = scan_step + 2 * scan_step
    # X = (I + A)^-1 B goes back as a transposed solve for dB and dA = -dB X^T, a [C, Dk + Dv] x
    # [Dk + Dv, C] matmul per chunk.
    solve_matrix_gradient = 2 * C * 2 * D * C * n_chunks * heads
    assert backward[aten.bmm] == 2 * (forward[aten.bmm] + forward[aten.baddbmm]) - skipped + solve_matrix_gradient
    assert backward[aten.linalg_solve_triangular] == forward[aten.linalg_solve_triangular]
