"""MoE model invariants (one process): routing, grouped experts, losses, bias balancing, checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.common.mlp import SwiGLU
from models.moe.model import MoE, MoEConfig, MoETransformer, grouped_mm_swiglu, grouped_swiglu, looped_swiglu
from models.moe.parallelize import check_layout
from parallel.options import ParallelizeOptions
from parallel.init import init_parameters
from parallel.mesh import ParallelDims

DIM, HIDDEN = 32, 48


def moe_layer(**kwargs) -> MoE:
    cfg = MoEConfig(dim=DIM, n_heads=4, vocab_size=64, moe_hidden_dim=HIDDEN, aux_loss_coef=1.0, z_loss_coef=1.0,
                    **kwargs)
    torch.manual_seed(0)
    layer = MoE(cfg).double()
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return layer


def copy_dense_into(layer: MoE) -> SwiGLU:
    """A dense SwiGLU whose weights every expert of `layer` gets."""
    dense = SwiGLU(DIM, HIDDEN, init_std=0.02, out_std=0.02).double()
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.2)
        layer.experts.w1.copy_(dense.w1.weight.t().expand_as(layer.experts.w1))
        layer.experts.w3.copy_(dense.w3.weight.t().expand_as(layer.experts.w3))
        layer.experts.w2.copy_(dense.w2.weight.t().expand_as(layer.experts.w2))
    return dense


def test_one_expert_top1_equals_dense_mlp():
    layer = moe_layer(n_experts=1, top_k=1)
    dense = copy_dense_into(layer)
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_identical_experts_with_renormalized_topk_equal_dense_mlp(router):
    layer = moe_layer(n_experts=4, top_k=2, router=router)
    dense = copy_dense_into(layer)
    x = torch.randn(3, 5, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-12)


def test_zero_router_logits_give_z_loss_ln_e_squared():
    n_experts = 8
    layer = moe_layer(n_experts=n_experts, top_k=2)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
    layer(torch.randn(64, DIM, dtype=torch.float64))
    assert layer.z_share.item() == pytest.approx(math.log(n_experts) ** 2, rel=1e-12)  # z_loss_coef = 1


def test_uniform_routing_gives_the_aux_loss_its_minimum():
    """P_i = 1/E and f_i = 1/E give aux = coef * E * sum_i 1/E^2 = coef (coef = 1 here)."""
    layer = moe_layer(n_experts=2, top_k=1)
    with torch.no_grad():  # logit +-x0 per expert: probabilities ~1/2, choices alternate
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0], layer.router.gate.weight[1, 0] = 1.0, -1.0
    x = torch.zeros(4, DIM, dtype=torch.float64)
    x[:, 0] = torch.tensor([1e-9, -1e-9, 1e-9, -1e-9])
    layer(x)
    assert layer.aux_share.item() == pytest.approx(1.0, rel=1e-6)


def test_aux_loss_is_larger_when_unbalanced():
    layer = moe_layer(n_experts=4, top_k=1)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 10.0
    x = torch.zeros(16, DIM, dtype=torch.float64)
    x[:, 0] = 1.0
    layer(x)
    assert layer.aux_share.item() > 3.0  # all tokens on one expert with p ~ 1: aux -> E


def test_attached_aux_loss_gradient_equals_adding_the_losses():
    """The shares a layer attaches to its output reach the backward with weight aux_loss_scale,
    as if scale * (aux + z) had been added to the objective by hand."""
    x = torch.randn(24, DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    attached, by_hand = moe_layer(top_k=2), moe_layer(top_k=2)
    attached.aux_loss_scale, by_hand.aux_loss_scale = 0.7, 0.0
    attached(x).square().sum().backward()
    out = by_hand(x)
    (out.square().sum() + 0.7 * (by_hand.aux_share + by_hand.z_share)).backward()
    grads = dict(by_hand.named_parameters())
    for name, p in attached.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-12, atol=1e-12, msg=name)
    router_grad_without_aux = torch.autograd.grad(by_hand(x).square().sum(), by_hand.router.gate.weight)[0]
    assert not torch.allclose(router_grad_without_aux, attached.router.gate.weight.grad)  # the aux term counts


def test_aux_free_bias_moves_toward_balance():
    cfg = MoEConfig(dim=DIM, n_layers=1, n_heads=4, vocab_size=64, n_experts=4, top_k=1, moe_hidden_dim=HIDDEN,
                    router="sigmoid", bias_update_rate=0.05, aux_loss_coef=0.0, z_loss_coef=0.0)
    model = MoETransformer(cfg)
    init_parameters(model, 0)
    layer = model.layers["0"].feed_forward
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a skewed router: expert 0 scores higher for most tokens
        layer.router.gate.weight.copy_(0.3 * torch.randn(4, DIM, generator=g))
        layer.router.gate.weight[0] += 0.4
    x = torch.randn(256, DIM, generator=g) + 0.5

    def imbalance():
        with torch.no_grad():
            experts = layer.router(x)[1]
        load = torch.bincount(experts.flatten(), minlength=4).float()
        return (load.max() / load.mean()).item()

    before = imbalance()
    for _ in range(40):
        with torch.enable_grad():
            layer(x)
        metrics = model.end_step()
    after = imbalance()
    assert before > 2.5 and after < 1.5, (before, after)
    assert layer.router.expert_bias[0] < 0  # the overloaded expert's selection bias went down
    assert {"moe_aux_loss", "moe_z_loss", "moe_load_max/0", "moe_dropped/0"} <= metrics.keys()


def test_grouped_path_with_no_rows_stays_in_the_graph():
    """An ep rank whose experts receive no tokens must still back-propagate through them (zero
    gradients, not None), or it would skip the backward all-to-alls its peers wait in."""
    w1, w3, w2 = (torch.randn(3, *shape, dtype=torch.float64, requires_grad=True)
                  for shape in ((DIM, HIDDEN), (DIM, HIDDEN), (HIDDEN, DIM)))
    x = torch.zeros(0, DIM, dtype=torch.float64, requires_grad=True)
    y = grouped_swiglu(x, [0, 0, 0], w1, w3, w2)
    assert y.shape == (0, DIM) and y.requires_grad
    y.sum().backward()
    assert all(w.grad is not None and not w.grad.any() for w in (w1, w3, w2)) and x.grad.shape == (0, DIM)


def per_token_swiglu(x, counts, w1, w3, w2):
    """Each row through its own expert's weights, gathered per row: no slicing, no grouping."""
    expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    h = F.silu(torch.einsum("md,mdh->mh", x, w1[expert])) * torch.einsum("md,mdh->mh", x, w3[expert])
    return torch.einsum("mh,mhd->md", h, w2[expert])


def expert_outputs_and_grads(fn, x, counts, weights, grad):
    leaves = [t.detach().requires_grad_() for t in (x, *weights)]
    y = fn(leaves[0], counts, *leaves[1:])
    y.backward(grad)
    return [y.detach()] + [t.grad for t in leaves]


def test_grouped_path_equals_per_token_reference_fp64():
    """Outputs and the gradients of rows and all three weights, fp64, with empty experts (first,
    middle, last) and uneven loads; the same comparison with the rows' experts permuted must fail."""
    g = torch.Generator().manual_seed(0)
    counts = [0, 5, 0, 9, 2, 0]
    x = torch.randn(sum(counts), DIM, generator=g, dtype=torch.float64)
    weights = [torch.randn(6, DIM, HIDDEN, generator=g, dtype=torch.float64),
               torch.randn(6, DIM, HIDDEN, generator=g, dtype=torch.float64),
               torch.randn(6, HIDDEN, DIM, generator=g, dtype=torch.float64)]
    grad = torch.randn(sum(counts), DIM, generator=g, dtype=torch.float64)
    want = expert_outputs_and_grads(per_token_swiglu, x, counts, weights, grad)
    got = expert_outputs_and_grads(grouped_swiglu, x, counts, weights, grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert all(not w[[0, 2, 5]].any() for w in got[2:])  # experts without rows get zero gradients
    # Negative control: the same rows cut into other experts (counts of another routing) must not match.
    wrong = expert_outputs_and_grads(grouped_swiglu, x, [0, 2, 9, 0, 5, 0], weights, grad)
    assert all(not torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(wrong, want))
    # The per-expert loop used as the benchmark's baseline agrees too.
    torch.testing.assert_close(looped_swiglu(x, counts, *weights), want[0], rtol=1e-12, atol=1e-12)


def test_grouped_mm_path_equals_per_token_reference_fp32():
    """The torch._grouped_mm path (CUDA's; torch's CPU fallback runs it here, fp32 at best) on counts that are
    not multiples of 16, empty experts included: outputs and all gradients equal the fp64 per-token
    reference to fp32 rounding; with one row moved between two experts the same comparison fails."""
    g = torch.Generator().manual_seed(1)
    counts = [0, 5, 0, 19, 2, 0, 16]
    x = torch.randn(sum(counts), DIM, generator=g, dtype=torch.float64)
    weights = [torch.randn(7, *shape, generator=g, dtype=torch.float64)
               for shape in ((DIM, HIDDEN), (DIM, HIDDEN), (HIDDEN, DIM))]
    grad = torch.randn(sum(counts), DIM, generator=g, dtype=torch.float64)
    want = expert_outputs_and_grads(per_token_swiglu, x, counts, weights, grad)

    def error(run_counts):
        got = expert_outputs_and_grads(grouped_mm_swiglu, x.float(), run_counts, [w.float() for w in weights],
                                       grad.float())
        return max(float((a.double() - b).norm() / b.norm()) for a, b in zip(got, want, strict=True))
    assert error(counts) < 1e-5
    assert error([0, 6, 0, 18, 2, 0, 16]) > 1e-2


@pytest.mark.parametrize("shared", [0, 1])
def test_layer_under_bf16_autocast_computes_what_fp32_does(shared):
    """Single-process bf16 runs compute under autocast: x (the residual stream) stays fp32 while the expert
    matmuls come out bf16; the layer must combine them (a GPU run once failed there: index_add of bf16 into
    fp32) and its output and input gradient stay within bf16 rounding of fp32's."""
    layer = moe_layer(n_experts=4, top_k=2, n_shared_experts=shared).float()
    x = torch.randn(2, 16, DIM, generator=torch.Generator().manual_seed(3))
    results = []
    for autocast in (False, True):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = layer(leaf)
        y.float().pow(2).sum().backward()
        results.append((y, leaf.grad))
    (y32, g32), (y16, g16) = results
    assert y16.dtype == torch.float32
    for got, want in ((y16, y32), (g16, g32)):
        assert float((got - want).detach().norm() / want.detach().norm()) < 3e-2


def test_capacity_drops_overflow_and_dropless_keeps_all():
    layer = moe_layer(n_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 10.0  # everything wants expert 0
    x = torch.zeros(8, DIM, dtype=torch.float64)
    x[:, 0] = 1.0
    with torch.enable_grad():
        out = layer(x)
    load = layer.step_stats
    dropped, assigned = load[4].item(), load[5].item()
    assert (dropped, assigned) == (6.0, 8.0)  # capacity ceil(1 * 1 * 8 / 4) = 2
    assert (out.abs().sum(-1) > 0).sum().item() == 2  # dropped tokens get no expert output


def test_group_limited_routing_keeps_choices_in_the_best_groups():
    layer = moe_layer(n_experts=8, top_k=2, router="sigmoid", n_groups=4, topk_groups=1)
    x = torch.randn(50, DIM, dtype=torch.float64)
    experts = layer.router(x)[1]
    assert torch.equal(experts[:, 0] // 2, experts[:, 1] // 2)  # both choices inside one group of 2


@pytest.mark.parametrize("changes, expected", [
    (dict(n_experts=6), "model.n_experts=6 is not divisible by parallel.ep=4"),
    (dict(top_k=9), "model.top_k=9 must be between 1 and model.n_experts=8"),
    (dict(n_groups=3), "model.n_experts=8 is not divisible by model.n_groups=3"),
])
def test_layout_problems_are_named(changes, expected):
    cfg = MoEConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, **changes)
    dims = ParallelDims.resolve(dp_shard=4, ep=4, world_size=4)
    problems = check_layout(cfg, dims, ParallelizeOptions())
    assert any(expected in problem for problem in problems), problems


def test_tp_must_divide_the_expert_hidden_size():
    """Expert tensor parallelism splits every expert's hidden units over tp: one line when they do not divide."""
    dims = ParallelDims.resolve(dp_shard=1, tp=4, world_size=4)
    cfg = MoEConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, moe_hidden_dim=30)
    problems = check_layout(cfg, dims, ParallelizeOptions())
    assert len(problems) == 1 and "parallel.tp=4 does not divide the expert hidden size 30" in problems[0], problems
    assert check_layout(MoEConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, moe_hidden_dim=32), dims,
                        ParallelizeOptions()) == []


@pytest.mark.parametrize("field", ["aux_loss_coef", "z_loss_coef", "bias_update_rate"])
def test_negative_loss_weights_and_bias_rates_are_refused(field):
    """A negative aux coefficient rewards imbalance; a negative rate silently turned balancing off."""
    with pytest.raises(ValueError, match=f"{field}=-0.1 must be >= 0"):
        MoEConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, **{field: -0.1})


def test_selective_checkpointing_is_refused_with_experts_of_their_own_fsdp_units():
    """torch 2.13's selective checkpointing fails on the experts' FSDP units inside a block (pytorch/torchtitan#3427):
    refused up front; full checkpointing, and selective without ep, are not."""
    cfg = MoEConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128)
    ep2 = ParallelDims.resolve(dp_shard=2, ep=2, world_size=2)
    (problem,) = check_layout(cfg, ep2, ParallelizeOptions(activation_checkpoint="selective"))
    assert problem.startswith("parallel.ep=2 with train.activation_checkpoint=selective fails under FSDP")
    assert check_layout(cfg, ep2, ParallelizeOptions(activation_checkpoint="full")) == []
    assert check_layout(cfg, ParallelDims.resolve(dp_shard=2, world_size=2),
                        ParallelizeOptions(activation_checkpoint="selective")) == []


def test_ep_must_divide_dp_shard_times_cp():
    from parallel.mesh import LayoutError

    with pytest.raises(LayoutError, match="parallel.ep=4 must divide dp_shard\\*cp = 2"):
        ParallelDims.resolve(dp_shard=2, tp=2, ep=4, world_size=4)
