"""Mixture-of-experts decoder: the LLM (models/llm) with MoE feed-forward layers.

Plain single-device PyTorch with two modules that parallelize.py turns parallel from outside:
`MoE.experts` (expert parallelism: the rows are moved to their experts' ranks by all-to-all,
parallel/expert.py) and `MoE.routing_statistics` (an identity on this rank's routing statistics
that becomes their sum over the ranks holding different tokens of a step, for the load-balancing
loss and the bias update).

Routers
- softmax (Mixtral): p = softmax(W x), top-k, weights renormalized over the chosen k.
- sigmoid (DeepSeek-V3): s = sigmoid(W x); experts are chosen by s + b, where the bias b is used
  only for selection and moved after every step toward balance (aux-loss-free balancing,
  `update_router_bias`); weights are the unbiased s normalized over the chosen k, x route_scale.
- group-limited routing (n_groups > 1): only experts in the topk_groups best groups are eligible
  (group score: the sum of its top-2 scores for sigmoid, its max for softmax).

Losses (each with its coefficient)
- Switch load balance: L_aux = coef * E * sum_i f_i P_i, f_i = (assignments to expert i) / (k T),
  P_i = mean router probability of i (sigmoid: scores normalized over experts); f and P over all
  T tokens of one forward on all ranks of the batch group. Its minimum under uniform routing is
  1 * coef (f_i = P_i = 1/E).
- ST-MoE router z-loss: L_z = coef * mean_t logsumexp(logits_t)^2; zero logits give (ln E)^2.
Each rank's stored loss is its share: summed over the batch group it is the loss of the global
batch of that forward (see `MoE.forward`). The shares are not returned with the output: each MoE
layer attaches its own to its output (`attach_loss`), so their gradient joins the backward wherever
the output goes, also through a pipeline stage, and no loss has to travel with the activations.
`aux_loss_scale` (set by the trainer) is the gradient weight of a forward's shares.

Dropless by default; capacity_factor > 0 keeps at most ceil(cf * k * N / E) assignments per
expert of a rank's N local tokens (top-1 choices first, then in token order); the rest are
dropped (their token passes through the residual only). Dropping is layout-dependent.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from models.common.linear import Linear
from models.common.mlp import SwiGLU
from models.common.sizes import check_sizes
from models.llm.model import LLMConfig, Transformer
from models.llm.model import flops_per_token as llm_flops_per_token


@dataclass
class MoEConfig(LLMConfig):
    n_experts: int = 8
    top_k: int = 2
    moe_hidden_dim: int = 0  # per routed expert; 0: the dense ffn hidden size (fine-grained: smaller)
    n_shared_experts: int = 0  # always-on experts of moe_hidden_dim each (DeepSeekMoE)
    n_dense_layers: int = 0  # the first layers keep a dense SwiGLU
    router: str = "softmax"  # softmax (Mixtral) | sigmoid (DeepSeek-V3)
    renormalize: bool = True  # softmax: renormalize the top-k weights (sigmoid always normalizes)
    route_scale: float = 1.0
    n_groups: int = 1  # group-limited routing: experts split into groups ...
    topk_groups: int = 1  # ... of which this many are eligible per token
    capacity_factor: float = 0.0  # 0: dropless
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    bias_update_rate: float = 0.0  # aux-loss-free balancing step gamma (DeepSeek-V3: 1e-3); 0: off

    def __post_init__(self):
        super().__post_init__()
        check_sizes(self, positive=("n_experts", "top_k", "n_groups", "topk_groups"),
                    non_negative=("moe_hidden_dim", "n_shared_experts", "n_dense_layers", "aux_loss_coef",
                                  "z_loss_coef", "bias_update_rate"))

    @property
    def expert_hidden_dim(self) -> int:
        return self.moe_hidden_dim or self.ffn_hidden_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - min(self.n_dense_layers, self.n_layers)


class Router(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Linear(cfg.dim, cfg.n_experts, cfg.init_std)
        # A parameter (not a buffer) so that it is initialized, sharded and checkpointed like the
        # weights; it gets no gradient and is moved only by MoE.update_bias.
        self.expert_bias = nn.Parameter(torch.zeros(cfg.n_experts), requires_grad=False)

    def init_parameter(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        full.zero_()  # expert_bias: no preference before any load is seen

    def forward(self, x: torch.Tensor):
        """x [N, d] -> (weights [N, k], experts [N, k], logits [N, E], probs [N, E])."""
        cfg = self.cfg
        logits = self.gate(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32 routing
        if cfg.router == "sigmoid":
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            scores = probs = logits.softmax(-1)
        choice = scores.detach() + self.expert_bias.to(scores.dtype) if cfg.bias_update_rate > 0 else scores.detach()
        if cfg.n_groups > 1:
            grouped = choice.unflatten(-1, (cfg.n_groups, -1))
            group_score = grouped.topk(2, -1).values.sum(-1) if cfg.router == "sigmoid" else grouped.amax(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(
                -1, group_score.topk(cfg.topk_groups, -1).indices, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)
        experts = choice.topk(cfg.top_k, -1).indices
        weights = scores.gather(-1, experts)
        if cfg.router == "sigmoid" or cfg.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * cfg.route_scale, experts, logits, probs


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights w1, w3 [E, d, h] (N(0, init_std)), w2 [E, h, d] (N(0, out_std)),
    computed grouped.

    Under expert parallelism the weights are DTensors sharded on dim 0 over the ep mesh, and the rows
    this module is handed are those of its E / ep local experts (parallel/expert.py moves them); under
    tensor parallelism also on the hidden dim h over tp, and its output is then a partial sum."""

    def __init__(self, n_experts: int, dim: int, hidden: int, init_std: float, out_std: float):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.init_std, self.out_std = init_std, out_std

    def init_parameter(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        full.normal_(0.0, self.out_std if name == "w2" else self.init_std, generator=generator)

    def local_weights(self):
        return [w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w3, self.w2)]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, d] sorted by (local) expert, counts[e] rows each -> y [M, d]."""
        return grouped_swiglu(x, counts.tolist(), *self.local_weights())


def grouped_swiglu(x: torch.Tensor, counts: list[int], w1, w3, w2) -> torch.Tensor:
    """x [M, d] sorted by expert, counts[e] rows each -> y [M, d]: torch._grouped_mm on CUDA (bf16), else
    one mm per expert on its contiguous slice of rows (no padding, each routed row multiplied once).

    The slices come from split / unbind, whose backwards are one cat / stack. Indexing x[s:t] and w[e]
    per expert instead (looped_swiglu) makes every expert's gradient a zero tensor of the full size
    that the backward then sums: E full-size copies of x and of each weight.
    No early exit for zero rows: the (empty) result must stay in the autograd graph, or an ep rank
    whose experts got no tokens would skip the backward all-to-alls its peers wait in."""
    if x.is_cuda and hasattr(torch, "_grouped_mm") and (x.dtype == torch.bfloat16 or _autocast_bf16(x)):
        # Under autocast (bf16 without FSDP) x and the weights arrive in fp32; autocast does not cover
        # torch._grouped_mm, so they are cast here as autocast would cast a matmul's inputs.
        return grouped_mm_swiglu(x.bfloat16(), counts, *(w.bfloat16() for w in (w1, w3, w2)))
    return split_swiglu(x, counts, w1, w3, w2)


def split_swiglu(x: torch.Tensor, counts: list[int], w1, w3, w2) -> torch.Tensor:
    """grouped_swiglu as one mm per expert on its slice of x (split / unbind, see there)."""
    experts = zip(x.split(counts), w1.unbind(0), w3.unbind(0), w2.unbind(0), strict=True)
    return torch.cat([(F.silu(xe @ a) * (xe @ b)) @ c for xe, a, b, c in experts])


def _autocast_bf16(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.bfloat16


def grouped_mm_swiglu(x: torch.Tensor, counts: list[int], w1, w3, w2) -> torch.Tensor:
    """grouped_swiglu by three torch._grouped_mm calls. Counts need no alignment: on an H200 (torch 2.11)
    counts that are not multiples of 16 gave outputs and gradients bitwise equal to one matmul per expert
    (benchmarks/results/gpu_suite.json)."""
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
    return torch._grouped_mm(h, w2, offs=offs)


def looped_swiglu(x: torch.Tensor, counts: list[int], w1, w3, w2) -> torch.Tensor:
    """Reference: one expert at a time, indexing x and the weights per expert (benchmarks and tests only)."""
    out, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n]
        out.append((F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e])
        start += n
    return torch.cat(out) if out else x.new_zeros(x.shape)


class AttachLoss(torch.autograd.Function):
    """Identity on x; its backward also back-propagates `loss` with gradient `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.loss_meta = scale, (loss.shape, loss.dtype, loss.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.loss_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def attach_loss(x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
    """x, with `scale * loss` added to the objective of any backward that passes through it."""
    return AttachLoss.apply(x, loss, scale)


class RoutingStatistics(nn.Module):
    """Identity on a rank's routing statistics [loads, probability sums, tokens, dropped, z]: the
    place where parallelize makes them the sums over all ranks holding tokens of the step."""

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return stats


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_experts, cfg.dim, cfg.expert_hidden_dim, cfg.init_std, cfg.out_std)
        self.shared = SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.expert_hidden_dim, cfg.init_std,
                             cfg.out_std) if cfg.n_shared_experts else None
        self.routing_statistics = RoutingStatistics()
        self.aux_share = self.z_share = None  # this rank's weighted aux / z loss of the last forward
        self.aux_loss_scale = 1.0  # gradient weight of the shares (trainer: undoes dp x cp averaging, / micro-batches)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.step_stats = None  # summed over the step's forwards: global load [E], dropped, assigned, aux, z, forwards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, shape = self.cfg, x.shape
        x = x.reshape(-1, shape[-1])
        n_tokens, k, n_experts = x.shape[0], cfg.top_k, cfg.n_experts
        weights, experts, logits, probs = self.router(x)

        # Assignments in priority order (all first choices, then second ...): sorted by expert, stably.
        flat_expert = experts.t().reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        sorted_expert = flat_expert[order]
        counts = torch.bincount(flat_expert, minlength=n_experts)
        if cfg.capacity_factor > 0:
            capacity = math.ceil(cfg.capacity_factor * k * n_tokens / n_experts)
            position = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[sorted_expert]
            kept = position < capacity
            order, sorted_expert = order[kept], sorted_expert[kept]
            kept_counts = counts.clamp(max=capacity)
        else:
            kept_counts = counts
        token = order % n_tokens
        route_weight = weights.t().reshape(-1)[order]

        # Routing statistics over the batch group: loads, router probabilities, token count, z.
        lse2 = torch.logsumexp(logits, -1).pow(2)
        stats = torch.cat([counts.float(), probs.detach().sum(0),
                           torch.stack([torch.tensor(float(n_tokens), device=x.device),
                                        (counts - kept_counts).sum().float(), lse2.detach().sum()])])
        stats = self.routing_statistics(stats)
        load, prob_sum, (total, dropped, lse2_sum) = stats[:n_experts], stats[n_experts:2 * n_experts], stats[-3:]
        fraction = load / (k * total)
        # Shares: summed over the batch group they are the losses of the whole batch of this forward.
        self.aux_share = cfg.aux_loss_coef * n_experts * (fraction * probs.sum(0)).sum() / total
        self.z_share = cfg.z_loss_coef * lse2.sum() / total
        if self.training and torch.is_grad_enabled():  # a training forward (not eval, not a sample)
            aux = cfg.aux_loss_coef * n_experts * (fraction * prob_sum).sum() / total
            row = torch.cat([load, torch.stack([dropped, k * total, aux, cfg.z_loss_coef * lse2_sum / total,
                                                torch.ones((), device=x.device)])])
            self.step_stats = row if self.step_stats is None else self.step_stats + row

        y = self.experts(x[token], kept_counts)
        # y is bf16 under autocast while x stays fp32: the weighted sum is taken in x's dtype.
        out = torch.zeros_like(x).index_add(0, token, y.to(x.dtype) * route_weight.unsqueeze(-1).to(x.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        if torch.is_grad_enabled():
            out = attach_loss(out, self.aux_share + self.z_share, self.aux_loss_scale)
        return out.view(shape)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing: b_i += gamma * sign(mean load - load_i) (same on every rank)."""
        delta = self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        bias = self.router.expert_bias
        if isinstance(bias, DTensor):
            local = distribute_tensor(delta.to(bias.dtype), bias.device_mesh, bias.placements, src_data_rank=None)
            bias.to_local().add_(local.to_local())
        else:
            bias.add_(delta.to(bias.dtype))


class MoETransformer(Transformer):
    """The LLM decoder whose feed-forward layers from n_dense_layers on are MoE layers."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        for i, layer in self.layers.items():
            if int(i) >= cfg.n_dense_layers:
                layer.feed_forward = MoE(cfg)

    def moe_layers(self) -> dict[str, MoE]:
        return {name.split(".")[1] if name.startswith("layers.") else name: m
                for name, m in self.named_modules() if isinstance(m, MoE)}

    def reset_stats(self) -> None:
        """Forget the routing statistics of the forwards since the last end_step."""
        for m in self.moe_layers().values():
            m.reset_stats()

    def set_aux_loss_scale(self, scale: float) -> None:
        """Gradient weight of each forward's aux + z shares (see `MoE.aux_loss_scale`)."""
        for m in self.moe_layers().values():
            m.aux_loss_scale = scale

    @torch.no_grad()
    def end_step(self) -> dict[str, float]:
        """After the optimizer step: move the selection biases from the step's global load (loads
        were all-reduced over the batch group in the forwards), close the step's statistics and
        return them: weighted aux and z loss (mean over the step's forwards, global batch) and per
        layer the min / max / mean tokens per expert per forward and the dropped fraction."""
        metrics = {}
        aux = z = 0.0
        for name, m in self.moe_layers().items():
            if m.step_stats is None:
                continue
            n_experts = m.cfg.n_experts
            stats = m.step_stats.cpu()
            load, (dropped, assigned, aux_sum, z_sum, forwards) = stats[:n_experts], stats[n_experts:]
            if m.cfg.bias_update_rate > 0:
                m.update_bias(m.step_stats[:n_experts])
            aux += float(aux_sum / forwards)
            z += float(z_sum / forwards)
            per_forward = load / forwards
            metrics.update({f"moe_load_min/{name}": float(per_forward.min()),
                            f"moe_load_max/{name}": float(per_forward.max()),
                            f"moe_load_mean/{name}": float(per_forward.mean()),
                            f"moe_dropped/{name}": float(dropped / assigned)})
            m.reset_stats()
        return {"moe_aux_loss": aux, "moe_z_loss": z, **metrics}


def flops_per_token(cfg: MoEConfig, seq_len: int) -> float:
    """The LLM's exact count with each MoE layer's dense FFN replaced by its active parameters:
    the router (d x E) plus top_k routed and n_shared shared experts (3 d h each)."""
    dense_ffn = 3 * cfg.dim * cfg.ffn_hidden_dim
    active = cfg.dim * cfg.n_experts + (cfg.top_k + cfg.n_shared_experts) * 3 * cfg.dim * cfg.expert_hidden_dim
    return llm_flops_per_token(cfg, seq_len) + 3 * 2 * cfg.n_moe_layers * (active - dense_ffn)
