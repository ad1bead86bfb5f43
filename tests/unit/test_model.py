"""models/llm + models/common + parallel/init: shapes, exact FLOPs, GQA, RoPE, causality, tying, init."""
import dataclasses
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import models
from models.common.loss import cross_entropy_sum
from models.common.norms import RMSNorm
from models.common.rope import apply_rope, rope_angles
from models.llm.model import LLMConfig, Transformer, flops_per_token
from parallel.activation_checkpoint import checkpoint_block
from parallel.init import canonical_name, init_parameters, materialize

aten = torch.ops.aten
VOCAB = 96
# A larger init than the default makes attention far from uniform, so position and token effects
# are well above the tolerances below.
SMALL = LLMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16, init_std=0.3)



def build(cfg: LLMConfig = SMALL, seed: int = 0, dtype=torch.float64) -> Transformer:
    model = Transformer(cfg).to(dtype)
    init_parameters(model, seed)
    return model


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_kv_heads", [0, 1, 2])
def test_forward_shape_dtype_finite(dtype, n_kv_heads):
    cfg = dataclasses.replace(SMALL, n_kv_heads=n_kv_heads)
    logits = build(cfg, dtype=dtype)(tokens(3, 11))
    assert logits.shape == (3, 11, VOCAB) and logits.dtype == dtype
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_kv_heads_default_to_heads_and_projection_shapes():
    cfg = dataclasses.replace(SMALL, n_kv_heads=0)
    assert cfg.kv_heads == cfg.n_heads
    attn = Transformer(SMALL).layers["0"].attention
    hd = SMALL.dim // SMALL.n_heads
    assert attn.wq.weight.shape == (SMALL.n_heads * hd, SMALL.dim)
    assert attn.wk.weight.shape == attn.wv.weight.shape == (SMALL.n_kv_heads * hd, SMALL.dim)
    assert attn.wo.weight.shape == (SMALL.dim, SMALL.n_heads * hd)


# ------------------------------------------------------------------------------------------ FLOPs


def _linear_weights(model: nn.Module) -> int:
    """Weights that take part in a matmul per token: every nn.Linear (the embedding lookup is free)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _count(model: nn.Module, seq: int, **counter_kwargs) -> dict:
    counter = FlopCounterMode(display=False, **counter_kwargs)
    with counter:
        model(tokens(1, seq)).sum().backward()
    return counter.get_flop_counts()["Global"]


FLOP_CONFIGS = [
    # dim 40 with multiple_of 32 rounds the SwiGLU width up (106 -> 128); 1.3x exercises the multiplier.
    LLMConfig(dim=40, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=VOCAB, multiple_of=32),
    LLMConfig(dim=40, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32),
    LLMConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16,
              ffn_dim_multiplier=1.3, tie_embeddings=True),
]


def _math_backend_counts(cfg: LLMConfig, seq: int) -> tuple[int, int]:
    """(matmul FLOPs, attention FLOPs) of one forward+backward, counted by FlopCounterMode on the math
    SDPA backend: there attention is plain bmm (QK^T and PV over the full T x T square, masked
    afterwards, i.e. counted non-causally), and each bmm/mm gets its two gradient bmms/mms."""
    model = Transformer(cfg)
    with sdpa_kernel(SDPBackend.MATH):
        counts = _count(model, seq)
    assert set(counts) <= {aten.mm, aten.bmm}, counts
    matmuls, attention = counts.get(aten.mm, 0), counts.get(aten.bmm, 0)
    # 2 FLOPs per weight per token forward, 4 backward (input and weight gradients).
    assert matmuls == 6 * _linear_weights(model) * seq
    # QK^T and PV, 2*T*T*hd FLOPs per query head each, forward; twice that backward.
    assert attention == 3 * 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq * seq
    return matmuls, attention


@pytest.mark.parametrize("cfg, seq", [(FLOP_CONFIGS[0], 8), (FLOP_CONFIGS[1], 8), (FLOP_CONFIGS[1], 13),
                                      (FLOP_CONFIGS[2], 11)], ids=["mha", "gqa-8", "gqa-13", "gqa-ffnmult-tied"])
def test_flops_per_token_is_exact(cfg, seq):
    matmuls, attention = _math_backend_counts(cfg, seq)
    # A causal query at position t sees t+1 keys: T(T+1)/2 of the T*T (query, key) pairs.
    causal = Fraction(attention) * Fraction(seq + 1, 2 * seq)
    assert causal.denominator == 1
    assert Fraction(flops_per_token(cfg, seq)) * seq == matmuls + causal


def test_flops_per_token_attention_term_grows_like_t_plus_one():
    cfg = FLOP_CONFIGS[1]
    weights = _linear_weights(Transformer(cfg))
    attention = {seq: Fraction(flops_per_token(cfg, seq)) - 6 * weights for seq in (8, 13, 64)}
    assert attention[13] / attention[8] == Fraction(13 + 1, 8 + 1)
    assert attention[64] / attention[8] == Fraction(64 + 1, 8 + 1)
    # At T = 1 causal and full attention coincide: the term equals what FlopCounterMode counts.
    _, counted = _math_backend_counts(cfg, 1)
    assert Fraction(flops_per_token(cfg, 1)) - 6 * weights == counted


def _fwd_sdpa(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _bwd_sdpa(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, q, k, v)


def test_flops_per_token_on_the_default_cpu_kernel():
    """The kernel the model really uses on CPU (_scaled_dot_product_flash_attention_for_cpu) is not in
    FlopCounterMode's registry, so give it torch's own SDPA formulas. Those count the attention forward
    non-causally (full T x T) and the backward as 5 bmms (it recomputes QK^T): 2.5x forward."""
    cfg, seq = FLOP_CONFIGS[1], 10
    model = Transformer(cfg)
    counts = _count(model, seq, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _fwd_sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _bwd_sdpa})
    assert set(counts) == {aten.mm, aten._scaled_dot_product_flash_attention_for_cpu,
                           aten._scaled_dot_product_flash_attention_for_cpu_backward}
    forward = counts[aten._scaled_dot_product_flash_attention_for_cpu]
    backward = counts[aten._scaled_dot_product_flash_attention_for_cpu_backward]
    assert forward == 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq * seq
    assert 2 * backward == 5 * forward
    assert counts[aten.mm] == 6 * _linear_weights(model) * seq
    # Model FLOPs (no recompute): backward = 2x forward; causal: (T+1)/(2T) of the square.
    model_flops = counts[aten.mm] + 3 * Fraction(forward) * Fraction(seq + 1, 2 * seq)
    assert Fraction(flops_per_token(cfg, seq)) * seq == model_flops


# ------------------------------------------------------------------------------------------ GQA


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 2), (4, 1), (6, 3)])
def test_gqa_equals_mha_with_repeated_kv_heads(n_heads, n_kv_heads):
    cfg = dataclasses.replace(SMALL, dim=8 * n_heads, n_heads=n_heads, n_kv_heads=n_kv_heads)
    gqa = build(cfg)
    mha = Transformer(dataclasses.replace(cfg, n_kv_heads=n_heads)).double()
    group = n_heads // n_kv_heads
    state = {}
    for name, value in gqa.state_dict().items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            # Query head h uses kv head h // group: repeat each kv head's rows `group` times in place.
            value = value.unflatten(0, (n_kv_heads, cfg.head_dim)).repeat_interleave(group, dim=0).flatten(0, 1)
        state[name] = value
    mha.load_state_dict(state)
    x = tokens(2, 12)
    torch.testing.assert_close(gqa(x), mha(x), rtol=0, atol=1e-10)
    # The check can fail: repeating the heads in the other order (tiled) changes the result.
    if n_kv_heads > 1:
        tiled = {k: (v.unflatten(0, (n_kv_heads, cfg.head_dim)).repeat(group, 1, 1).flatten(0, 1)
                     if k.endswith(("attention.wk.weight", "attention.wv.weight")) else v)
                 for k, v in gqa.state_dict().items()}
        mha.load_state_dict(tiled)
        assert (gqa(x) - mha(x)).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ RoPE


def test_rope_matches_complex_rotation():
    """Pair (x[2i], x[2i+1]) at position p is rotated by p * theta^(-2i/D), as complex multiplication."""
    head_dim, theta = 16, 500.0
    positions = torch.tensor([[0, 1, 5, 77, 300]])
    x = torch.randn(1, 5, 3, head_dim, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_angles(positions, head_dim, theta)
    assert cos.shape == sin.shape == (1, 5, head_dim // 2)
    got = apply_rope(x, cos, sin)
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rotation = torch.polar(torch.ones(1, 5, head_dim // 2, dtype=torch.float64),
                           positions.double().unsqueeze(-1) * freqs).unsqueeze(-2)
    expected = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * rotation).flatten(-2)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)
    assert torch.equal(got[:, 0], x[:, 0])  # position 0: no rotation
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))  # rotations keep the norm


def test_positions_none_is_arange():
    model, x = build(), tokens(2, 9)
    assert torch.equal(model(x), model(x, torch.arange(9).unsqueeze(0)))
    assert torch.equal(model(x), model(x, torch.arange(9).expand(2, 9)))


# The model computes RoPE in fp64 for an fp64 model, so a shift changes logits only by rounding.
SHIFT_ATOL = 1e-10


@pytest.mark.parametrize("shift", [1, 17, 1000])
def test_shifting_all_positions_leaves_logits_unchanged(shift):
    model, x = build(), tokens(2, 12)
    positions = torch.arange(12).unsqueeze(0)
    reference = model(x, positions)
    torch.testing.assert_close(model(x, positions + shift), reference, rtol=0, atol=SHIFT_ATOL)
    # Per-row positions: only the second row shifted.
    rows = torch.stack([torch.arange(12), torch.arange(12) + shift])
    torch.testing.assert_close(model(x, rows), reference, rtol=0, atol=SHIFT_ATOL)
    # The check can fail: changing relative distances (stretching the positions) moves the logits.
    assert (model(x, positions * 2 + shift) - reference).abs().max() > 1e3 * SHIFT_ATOL


# ------------------------------------------------------------------------------------------ causality


@pytest.mark.parametrize("t", [0, 5, 11])
def test_causal_future_tokens_do_not_change_the_past(t):
    model = build()
    x = tokens(2, 12)
    changed = x.clone()
    changed[:, t] = (x[:, t] + 1 + torch.arange(2)) % VOCAB
    before, after = model(x), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-12)
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=-1).min() > 1e-6  # the changed token and later ones move


# ------------------------------------------------------------------------------------------ tying


def test_materializing_a_meta_model_keeps_tied_embeddings_tied():
    """The trainer builds on the meta device; nn.Module.to_empty alone unties (the control), so
    single-process and tp runs trained an untied model with the head initialized on its own."""
    with torch.device("meta"):
        plain, kept = (Transformer(dataclasses.replace(SMALL, tie_embeddings=True)) for _ in range(2))
    plain.to_empty(device="cpu")
    assert plain.output.weight is not plain.tok_embeddings.weight
    materialize(kept, "cpu", seed=0)
    assert kept.output.weight is kept.tok_embeddings.weight and kept.output.weight.device.type == "cpu"
    assert len(list(kept.parameters())) == len(list(plain.parameters())) - 1


def test_tied_embeddings_share_one_parameter():
    tied_cfg = dataclasses.replace(SMALL, tie_embeddings=True)
    tied, untied = Transformer(tied_cfg), Transformer(SMALL)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert isinstance(tied.output.weight, nn.Parameter)
    names = [name for name, _ in tied.named_parameters()]
    assert len(names) == len(set(names)) == len(list(untied.named_parameters())) - 1
    assert sum(1 for _, p in tied.named_parameters() if p is tied.tok_embeddings.weight) == 1
    assert sum(p.numel() for p in tied.parameters()) == \
        sum(p.numel() for p in untied.parameters()) - SMALL.vocab_size * SMALL.dim
    # After init and a backward pass both uses land in the one tensor.
    init_parameters(tied, 0)
    assert tied.output.weight is tied.tok_embeddings.weight
    tied(tokens(1, 6)).sum().backward()
    assert tied.output.weight.grad is tied.tok_embeddings.weight.grad
    assert untied.output.weight is not untied.tok_embeddings.weight


# ------------------------------------------------------------------------------------------ init


def test_same_seed_same_weights_different_seed_different_weights():
    a, b, c = build(seed=7), build(seed=7), build(seed=8)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
        if name.endswith("norm.weight"):
            assert torch.equal(pa, torch.ones_like(pa)) and torch.equal(pc, pa), name
        else:
            assert not torch.equal(pa, pc), name


def test_init_is_keyed_by_parameter_name_not_by_order():
    """A parameter's values depend only on (seed, name): a deeper model shares its first layers' draws."""
    shallow = dict(build(dataclasses.replace(SMALL, scaled_residual_init=False)).named_parameters())
    deep = dict(build(dataclasses.replace(SMALL, n_layers=3, scaled_residual_init=False)).named_parameters())
    for name, value in shallow.items():
        assert torch.equal(deep[name], value), name
    # Two parameters of the same shape get independent draws.
    assert not torch.equal(shallow["layers.0.attention.wq.weight"], shallow["layers.1.attention.wq.weight"])


def test_init_std_and_scaled_residual_projections():
    cfg = LLMConfig(dim=256, n_layers=3, n_heads=4, vocab_size=128, multiple_of=64, init_std=0.02)
    model = build(cfg, seed=3, dtype=torch.float32)
    std, scaled = cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        expected = scaled if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else std
        # >= 16k samples per matrix: the sample std is within ~1% (6 sigma) of the true one.
        assert p.std().item() == pytest.approx(expected, rel=0.05), name
        assert abs(p.mean().item()) < 6 * expected / p.numel() ** 0.5, name
    wq, wo = model.layers["1"].attention.wq.weight, model.layers["1"].attention.wo.weight
    assert (wo.std() / wq.std()).item() == pytest.approx((2 * cfg.n_layers) ** -0.5, rel=0.05)
    # Without scaled_residual_init the output projections get the plain std.
    plain = build(dataclasses.replace(cfg, scaled_residual_init=False), seed=3, dtype=torch.float32)
    assert plain.layers["1"].feed_forward.w2.weight.std().item() == pytest.approx(std, rel=0.05)


def _wrapped(mode: str, seed: int) -> Transformer:
    model = Transformer(SMALL).double()
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_block(block, mode)
    init_parameters(model, seed)
    return model


def _loss_and_grads(model: Transformer, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(x[:, :-1])
    loss = cross_entropy_sum(logits, x[:, 1:]) / x[:, 1:].numel()
    loss.backward()
    return loss.detach(), {canonical_name(n): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_init_loss_and_grads(mode):
    plain = build(seed=5)
    wrapped = _wrapped(mode, seed=5)
    raw_names = [n for n, _ in wrapped.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n in raw_names)  # the wrapper is really there
    plain_params = dict(plain.named_parameters())
    wrapped_params = {canonical_name(n): p for n, p in wrapped.named_parameters()}
    assert wrapped_params.keys() == plain_params.keys()
    for name, p in plain_params.items():
        assert torch.equal(wrapped_params[name], p), name

    # Count how often block 0's attention runs: checkpointing recomputes it in backward.
    calls = []
    inner = wrapped.layers["0"]._checkpoint_wrapped_module
    handle = inner.attention.register_forward_pre_hook(lambda *_: calls.append(1))
    x = tokens(2, 13)
    loss, grads = _loss_and_grads(plain, x)
    wrapped_loss, wrapped_grads = _loss_and_grads(wrapped, x)
    handle.remove()
    assert len(calls) == 2
    torch.testing.assert_close(wrapped_loss, loss, rtol=1e-12, atol=0)
    assert grads.keys() == wrapped_grads.keys()
    for name, g in grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(wrapped_grads[name], g, rtol=1e-10, atol=1e-13, msg=name)


def test_checkpoint_block_rejects_unknown_mode():
    with pytest.raises(ValueError, match="nope"):
        checkpoint_block(Transformer(SMALL).layers["0"], "nope")


# ------------------------------------------------------------------------------------------ fp64 precision


def test_rmsnorm_keeps_fp64_precision():
    x = torch.randn(4, 7, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    norm = RMSNorm(64).double()
    expected = x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def test_rope_keeps_fp64_precision():
    model, x = build(), tokens(2, 12)
    positions = torch.arange(12).unsqueeze(0)
    torch.testing.assert_close(model(x, positions + 1000), model(x, positions), rtol=0, atol=1e-11)


# ------------------------------------------------------------------------------------------ spec


def test_model_spec_registry():
    spec = models.get_model_spec("llm")
    assert spec.name == "llm"
    assert spec.config_cls is LLMConfig and spec.model_cls is Transformer
    assert spec.flops_per_token is flops_per_token
    assert set(spec.data.keys) == {"tokens", "positions", "targets", "document_ids"}
    assert "llm" in models.FAMILIES
    with pytest.raises(KeyError):
        models.get_model_spec("no-such-family")
