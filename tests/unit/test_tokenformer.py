"""TokenFormer on one process: Pattention's invariants, the layer as the reference builds it, its
parameter count, initialization and exact FLOPs (against FlopCounterMode)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import get_model_spec
from models.common.norms import LayerNorm
from models.tokenformer.model import (Pattention, TokenFormer, TokenFormerConfig, flops_per_token,
                                      pattention_parameters)
from parallel.init import init_parameters
from parallel.mesh import ParallelDims
from parallel.options import ParallelizeOptions

VOCAB = 64
SMALL = TokenFormerConfig(dim=32, n_layers=2, n_heads=4, vocab_size=VOCAB, qkv_tokens=24, proj_tokens=20,
                          ffn_tokens=48, rotary_fraction=0.5)


def pattention(normalization: str, n: int = 12, tau: float | None = None, seed: int = 0) -> Pattention:
    layer = Pattention(8, 6, n, normalization, tau or math.sqrt(n), key_std=0.5, value_std=0.5).double()
    init_parameters(layer, seed)
    return layer


def test_softmax_mode_is_softmax_times_n_times_values():
    layer = pattention("softmax", n=12)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    scores = x @ layer.key_param_tokens.T
    want = torch.softmax(scores, -1) * 12 @ layer.value_param_tokens
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_l2_norm_gelu_is_the_papers_equation():
    """GELU(A * sqrt(n) / ||A||) V (the reference's l2_norm_gelu, the paper's Eq. 5 with tau = sqrt(n))."""
    layer = pattention("l2_norm_gelu", n=12)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    scores = x @ layer.key_param_tokens.T
    want = F.gelu(scores * math.sqrt(12) / scores.norm(dim=-1, keepdim=True)) @ layer.value_param_tokens
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_l2_norm_gelu_is_invariant_to_positive_input_scaling():
    layer = pattention("l2_norm_gelu")
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    for scale in (0.01, 3.0, 1e4):
        torch.testing.assert_close(layer(scale * x), layer(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalization", ["gelu_l2_norm", "softmax"])
def test_normalizing_after_the_nonlinearity_is_not_scale_invariant(normalization):
    """Control for the invariance test, and a fact: GELU is not homogeneous, so GELU(cA) / ||GELU(cA)||
    depends on c (the L2 norm *after* GELU does not make gelu_l2_norm invariant); softmax neither."""
    layer = pattention(normalization)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    assert not torch.allclose(layer(3.0 * x), layer(x), rtol=1e-3)


def test_fixed_tau_scales_the_output_and_sqrt_n_is_the_default():
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    default, fixed = pattention("gelu_l2_norm", n=12), pattention("gelu_l2_norm", n=12, tau=2.0)
    torch.testing.assert_close(fixed(x) * math.sqrt(12) / 2.0, default(x), rtol=1e-12, atol=1e-12)


def test_parameters_per_layer_are_2d_times_token_counts():
    model = TokenFormer(SMALL)
    block = model.layers["0"]
    assert sum(p.numel() for p in block.parameters()) == pattention_parameters(SMALL) \
        == 2 * 32 * (3 * 24 + 20 + 48)
    # Non-parametric pre-norms, a parametric final norm, tied embeddings.
    assert not list(block.attention_norm.parameters()) and not list(block.ffn_norm.parameters())
    assert isinstance(model.norm, LayerNorm) and model.norm.weight is not None and model.norm.bias is not None
    assert model.output.weight is model.tok_embeddings.weight
    total = sum(p.numel() for p in model.parameters())
    assert total == 2 * pattention_parameters(SMALL) + VOCAB * 32 + 2 * 32


def test_defaults_follow_the_reference_ratios():
    cfg = TokenFormerConfig(dim=64)
    assert (cfg.qkv_tokens, cfg.proj_tokens, cfg.ffn_tokens) == (64, 64, 256)
    assert cfg.tau("ffn") == 16.0 and TokenFormerConfig(dim=64, ffn_tau=3.0).tau("ffn") == 3.0
    assert 16 * 64 ** 2 == pattention_parameters(cfg)  # 16 d^2 per layer at n = d, n_ffn = 4d


def test_initialization_keys_and_values():
    cfg = TokenFormerConfig(dim=256, n_layers=4, n_heads=4, vocab_size=VOCAB)
    model = TokenFormer(cfg)
    init_parameters(model, seed=0)
    ffn = model.layers["1"].feed_forward
    assert ffn.key_param_tokens.std().item() == pytest.approx(0.02, rel=0.02)
    assert ffn.value_param_tokens.std().item() == pytest.approx(2 / (4 * math.sqrt(256)), rel=0.02)
    assert model.layers["0"].attention.wo.key_param_tokens.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.norm.weight.eq(1).all() and model.norm.bias.eq(0).all()


def test_rope_rotates_only_the_rotary_fraction_of_each_head():
    """With RoPE on half of each head's dims, shifting every position changes only those dims of q/k."""
    model = TokenFormer(SMALL).double()
    init_parameters(model, seed=0)
    attention = model.layers["0"].attention
    seen = {}
    attention.core_attention.register_forward_hook(lambda m, args, out: seen.setdefault("q", []).append(args[0]))
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    attention(x, torch.arange(6).unsqueeze(0))
    attention(x, torch.arange(6).unsqueeze(0) + 5)
    q0, q5 = seen["q"]
    rotary = SMALL.rotary_dim
    assert rotary == 4 and not torch.allclose(q0[..., :rotary], q5[..., :rotary])
    torch.testing.assert_close(q0[..., rotary:], q5[..., rotary:], rtol=0, atol=0)


@pytest.mark.parametrize("seq", [8, 11])
def test_flops_per_token_is_exact(seq):
    """The formula against FlopCounterMode on the math SDPA backend (it computes the whole T x T square;
    the causal part is (T + 1) / (2 T) of it)."""
    model = TokenFormer(SMALL)
    init_parameters(model, seed=0)
    tokens = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    measured = counter.get_total_flops()
    square_attention = 3 * SMALL.n_layers * 4 * SMALL.n_heads * SMALL.head_dim * seq * seq
    causal_attention = square_attention * (seq + 1) / (2 * seq)
    assert flops_per_token(SMALL, seq) * seq == pytest.approx(measured - square_attention + causal_attention, rel=1e-12)


def test_layout_problems_name_the_misfit():
    spec = get_model_spec("tokenformer")
    cfg = TokenFormerConfig(dim=32, n_layers=2, n_heads=4, vocab_size=VOCAB, qkv_tokens=30)
    problems = spec.check_layout(cfg, ParallelDims.resolve(world_size=4, tp=4, dp_shard=1), ParallelizeOptions())
    assert len(problems) == 1 and "qkv_tokens 30" in problems[0] and "tp values that work" in problems[0]
    assert not spec.check_layout(cfg, ParallelDims.resolve(world_size=2, tp=2, dp_shard=1), ParallelizeOptions())
    assert spec.check_layout(dataclasses.replace(cfg, normalization="l3"), ParallelDims.resolve(world_size=1),
                             ParallelizeOptions())
    assert spec.check_layout(cfg, ParallelDims.resolve(world_size=2, pp=2, dp_shard=1), ParallelizeOptions())
    # values the model would take, then fail on mid-run (rotary dims beyond the head, a negative range of angles)
    for fraction in (1.5, -0.5):
        (problem,) = spec.check_layout(dataclasses.replace(cfg, rotary_fraction=fraction),
                                       ParallelDims.resolve(world_size=1), ParallelizeOptions())
        assert problem.startswith(f"model.rotary_fraction={fraction} must be between 0 and 1")
    (problem,) = spec.check_layout(dataclasses.replace(cfg, ffn_tau=-1.0), ParallelDims.resolve(world_size=1),
                                   ParallelizeOptions())
    assert problem.startswith("model.ffn_tau=-1.0 must be >= 0")
