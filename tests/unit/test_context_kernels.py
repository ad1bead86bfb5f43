"""parallel/context on one process: block kernels against autograd on plain softmax, the merge of
partials, the single-rank ring path, the sequence layouts and the one-line errors."""
import sys

import pytest
import torch

from parallel.context import (ContextParallelAttention, CpuFlashKernel, MathKernel, SequenceLayout, get_kernel,
                              merge_partials, ring_attention)
from parallel.context.flash_attn_kernel import (FlashAttnKernel, _supported_arguments, flash_attn_available,
                                                flash_attn_import_error)

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # (query heads, kv heads)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}



def reference_attention(q, k, v, causal: bool, scale: float | None = None):
    """(out, lse) by plain softmax on [B, T, H, D] tensors, differentiable by autograd: independent
    of every kernel's hand-written backward."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).triu(1),
                                    float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), torch.logsumexp(scores, -1)


def random_qkv(heads, dtype, seed=0, batch=2, seq=16, dim=8):
    gen = torch.Generator().manual_seed(seed)
    q_heads, kv_heads = heads
    q = torch.randn(batch, seq, q_heads, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, seq, kv_heads, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(batch, seq, q_heads, dim, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dout)]


def reference_with_grads(q, k, v, dout, causal):
    """fp64 reference out, lse, dq, dk, dv."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = reference_attention(q, k, v, causal)
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def max_error(got, want) -> float:
    return (got.double() - want.double()).abs().max().item()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("kernel, dtype", [
    (MathKernel(), torch.float64), (CpuFlashKernel(), torch.float64), (CpuFlashKernel(), torch.float32),
], ids=["math-fp64", "cpu-fp64", "cpu-fp32"])
def test_kernel_matches_plain_softmax(kernel, dtype, heads, causal):
    q, k, v, dout = random_qkv(heads, dtype)
    scale = q.shape[-1] ** -0.5
    out, lse = kernel.fwd(q, k, v, causal, scale)
    assert out.dtype == dtype and lse.dtype == dtype and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    dq, dk, dv = kernel.bwd(dout, q, k, v, out, lse, causal, scale)
    assert dk.shape == k.shape and dv.shape == v.shape
    for got, want in zip((out, lse, dq, dk, dv), reference_with_grads(q, k, v, dout, causal)):
        assert max_error(got, want) <= TOLERANCE[dtype]


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_cpu_kernel_matches_math_kernel(heads):
    q, k, v, dout = random_qkv(heads, torch.float32, seed=1)
    for causal in (True, False):
        cpu_out, cpu_lse = CpuFlashKernel().fwd(q, k, v, causal, 0.3)
        math_out, math_lse = MathKernel().fwd(q, k, v, causal, 0.3)
        cpu_grads = CpuFlashKernel().bwd(dout, q, k, v, cpu_out, cpu_lse, causal, 0.3)
        math_grads = MathKernel().bwd(dout, q, k, v, math_out, math_lse, causal, 0.3)
        for got, want in zip((cpu_out, cpu_lse, *cpu_grads), (math_out, math_lse, *math_grads)):
            assert max_error(got, want) <= 1e-5


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_merging_two_key_halves_is_full_attention(heads, causal):
    """The late half of the queries over the early keys (whole) and the late keys (causal if causal)."""
    q, k, v, _ = random_qkv(heads, torch.float64, seed=2)
    half = q.shape[1] // 2
    kernel = MathKernel()
    out, lse = kernel.fwd(q[:, half:], k[:, :half], v[:, :half], False, 0.35)
    late_out, late_lse = kernel.fwd(q[:, half:], k[:, half:], v[:, half:], causal, 0.35)
    out, lse = merge_partials(out, lse, late_out, late_lse)
    want_out, want_lse = reference_attention(q, k, v, causal, 0.35)
    assert max_error(out, want_out[:, half:]) <= 1e-10
    assert max_error(lse, want_lse[:, :, half:]) <= 1e-10


def test_merge_does_not_overflow_on_far_apart_lse():
    out, block_out = torch.zeros(1, 2, 1, 3), torch.ones(1, 2, 1, 3)
    lse = torch.zeros(1, 1, 2)
    merged_out, merged_lse = merge_partials(out, lse, block_out, lse + 1000.0)  # log(1 + e^1000) is inf in fp32
    assert torch.equal(merged_out, block_out) and torch.equal(merged_lse, lse + 1000.0)
    merged_out, merged_lse = merge_partials(out, lse, block_out, lse - 1000.0)
    assert torch.equal(merged_out, out) and torch.equal(merged_lse, lse)


@pytest.mark.parametrize("kernel", ["math", "cpu_flash"])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_ring_of_one_is_attention_with_gradients(heads, kernel):
    q, k, v, dout = random_qkv(heads, torch.float64, seed=3)
    for causal in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = ring_attention(*leaves, None, causal=causal, kernel=kernel)
        out.backward(dout)
        got = (out, lse, *(t.grad for t in leaves))
        for g, w in zip(got, reference_with_grads(q, k, v, dout, causal)):
            assert max_error(g, w) <= 1e-10


def test_zigzag_positions():
    assert SequenceLayout("zigzag", 2).global_positions(8, 0).tolist() == [0, 1, 6, 7]
    assert SequenceLayout("zigzag", 2).global_positions(8, 1).tolist() == [2, 3, 4, 5]
    assert SequenceLayout("contiguous", 3).global_positions(6, 2).tolist() == [4, 5]
    # Hybrid, ring 2 x ulysses 2: ring rank 0 holds chunks 0 and 3 of 4, split over its two ulysses ranks.
    hybrid = SequenceLayout("zigzag", ring_size=2, ulysses_size=2)
    assert [hybrid.global_positions(16, rank).tolist() for rank in range(4)] == [
        [0, 1, 2, 3], [12, 13, 14, 15], [4, 5, 6, 7], [8, 9, 10, 11]]


@pytest.mark.parametrize("layout", [SequenceLayout("zigzag", 4), SequenceLayout("contiguous", 3),
                                    SequenceLayout("zigzag", 2, 2), SequenceLayout("contiguous", 1, 4)],
                         ids=["zigzag4", "contiguous3", "hybrid2x2", "ulysses4"])
def test_shard_unshard_round_trip(layout):
    seq = 2 * layout.cp_size * 3
    x = torch.randn(2, seq, 3)
    shards = [layout.shard(x, rank) for rank in range(layout.cp_size)]
    assert all(s.shape == (2, seq // layout.cp_size, 3) for s in shards)
    assert torch.equal(layout.unshard(shards), x)
    positions = torch.cat([layout.global_positions(seq, rank) for rank in range(layout.cp_size)])
    assert sorted(positions.tolist()) == list(range(seq))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"not divisible by 2 x cp = 8"):
        SequenceLayout("zigzag", 4).global_positions(36, 0)
    with pytest.raises(ValueError, match=r"valid layouts: zigzag, contiguous"):
        SequenceLayout("stripe", 2)
    with pytest.raises(ValueError, match=r"valid modes: ring, ulysses, hybrid"):
        ContextParallelAttention("llama3", None)
    with pytest.raises(ValueError, match=r"valid kernels"):
        get_kernel("xformers", torch.device("cpu"))
    q, k, v, _ = random_qkv((2, 2), torch.float64)
    with pytest.raises(ValueError, match=r"square block"):  # unequal causal lengths align differently per kernel
        MathKernel().fwd(q, k[:, :8], v[:, :8], True, 1.0)
    with pytest.raises(ValueError, match=r"runs on CUDA"):
        get_kernel("flash_attn", torch.device("cpu"))


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed")
def test_flash_attn_requested_but_missing_is_an_error():
    # The reason is the import error itself (here: no flash_attn module at all).
    with pytest.raises(ValueError, match=r"flash-attn's kernels, which do not import \(ModuleNotFoundError: No module"):
        get_kernel("flash_attn", torch.device("cuda"))
    with pytest.raises(ValueError, match=r"do not import"):
        get_kernel("auto", torch.device("cuda"))


@torch.library.custom_op("shardwright_test::flash_attn_forward", mutates_args=())
def fake_flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float,
                            causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                            alibi_slopes: torch.Tensor | None, return_softmax: bool) -> torch.Tensor:
    """flash-attn >= 2.7's _flash_attn_forward signature, a torch custom op as there (its own signature is
    (*args, **kwargs))."""
    return q * softmax_scale


def test_flash_attn_arguments_reach_a_custom_op():
    q = torch.randn(1, 4, 2, 8)
    arguments = _supported_arguments(fake_flash_attn_forward, dict(
        q=q, k=q, v=q, dropout_p=0.0, softmax_scale=0.5, causal=True, softcap=0.0, alibi_slopes=None,
        return_softmax=False, deterministic=True))  # deterministic: a backward's argument, not the forward's
    assert sorted(arguments) == sorted(["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left",
                                        "window_size_right", "softcap", "alibi_slopes", "return_softmax"])
    assert (arguments["window_size_left"], arguments["window_size_right"]) == (-1, -1)
    torch.testing.assert_close(fake_flash_attn_forward(**arguments), q * 0.5)


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed")
def test_flash_attn_without_its_compiled_extension_is_unavailable(tmp_path, monkeypatch):
    """A flash_attn package whose extension does not import (built for another torch, say) is unavailable, with
    the import error as the reason, rather than failing at the first kernel call."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (tmp_path / "flash_attn" / "flash_attn_interface.py").write_text("import flash_attn_2_cuda\n")
    monkeypatch.syspath_prepend(tmp_path)
    flash_attn_import_error.cache_clear()
    try:
        assert not flash_attn_available()
        assert "No module named 'flash_attn_2_cuda'" in flash_attn_import_error()
    finally:
        sys.modules.pop("flash_attn", None)
        flash_attn_import_error.cache_clear()


@pytest.mark.skipif(not (torch.cuda.is_available() and flash_attn_available()), reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_flash_attn_kernel_matches_math_kernel(heads):
    """flash-attn's bf16 kernel and the math kernel in bf16, each against the fp64 reference on the same inputs:
    flash-attn's error (out, lse, dq, dk, dv) at most twice the math kernel's, plus a floor for where the math
    kernel happens to be exact."""
    q, k, v, dout = (t.cuda() for t in random_qkv(heads, torch.bfloat16, seq=64, dim=64))
    for causal in (True, False):
        reference = reference_with_grads(q, k, v, dout, causal)
        out, lse = FlashAttnKernel().fwd(q, k, v, causal, 0.125)
        math_out, math_lse = MathKernel().fwd(q, k, v, causal, 0.125)
        grads = FlashAttnKernel().bwd(dout, q, k, v, out, lse, causal, 0.125)
        math_grads = MathKernel().bwd(dout, q, k, v, math_out, math_lse, causal, 0.125)
        for name, got, math, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads),
                                         (math_out, math_lse, *math_grads), reference):
            assert max_error(got, want) <= 2 * max_error(math, want) + 1e-3, (name, causal)
