"""MatFormer: the LLM with nested SwiGLU feed-forwards, plain single-device PyTorch.

Every FFN's hidden units are ordered by importance: a submodel uses the first w_l units of layer l
(gate w1, up w3 and down w2 sliced with the same prefix), so one set of weights holds a model per
granularity (w = fraction x hidden size, default 1/8, 1/4, 1/2, 1) and, per layer, any mix of them
(Mix'n'Match). Which submodel a row of a batch runs is an input: `ffn_widths` [rows, n_layers],
the hidden units each layer of that row uses (no input: the full model). Rows that run the same
submodel must be consecutive; each such run is computed with its own prefix.

Parameter names are the LLM's: a submodel is a dense `llm` made of the prefix weights
(models/matformer/extract.py). Reference: MatFormer-OLMo, olmo/model.py::OlmoSequentialBlock.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.common.decoder import Decoder, TransformerBlock
from models.common.linear import Embedding, Linear
from models.common.norms import RMSNorm
from models.llm.model import Attention, LLMConfig, flops_per_attention_pair
from models.spec import execution_field

MODES = ("joint", "sampled")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)  # YAML's true is an int to Python


@dataclass
class MatFormerConfig(LLMConfig):
    # Nested FFN widths as fractions of the hidden size, smallest first, the last 1 (the full model).
    granularities: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    # joint: every step runs its batch through every granularity, loss sum_i weight_i L_i (the reference);
    # sampled: each micro-batch runs one granularity, drawn with probability ~ weight_i from (seed, step,
    # micro-batch), the same on every rank.
    mode: str = execution_field("joint")
    weights: list[float] = execution_field(default_factory=list)  # per granularity; empty: 1 each
    # Mix'n'Match submodels (a granularity per layer) that evaluation reports besides the granularities.
    mix_n_match: list[list[float]] = execution_field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        g = self.granularities
        # The first problem found, named on its own: "not increasing" says more than the list of every rule.
        if not g or not all(_is_number(f) and 0 < f <= 1 for f in g):
            problem = "must be fractions of the FFN hidden size in (0, 1]"
        elif list(g) != sorted(set(g)):
            problem = "must be strictly increasing (the smallest submodel first)"
        elif g[-1] != 1:
            problem = "must end in 1 (the full model)"
        else:
            problem = None
        if problem:
            raise ValueError(f"granularities={g} {problem}, e.g. [0.125, 0.25, 0.5, 1]")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.weights and (len(self.weights) != len(g) or not all(_is_number(w) and w >= 0 for w in self.weights)
                             or not sum(self.weights) > 0):
            raise ValueError(f"weights={self.weights} must be {len(g)} non-negative numbers (one per granularity), "
                             f"not all zero")
        for i, vector in enumerate(self.mix_n_match):
            if not isinstance(vector, list) or len(vector) != self.n_layers:
                raise ValueError(f"mix_n_match[{i}]={vector} must list one granularity per layer "
                                 f"({self.n_layers} layers, model.n_layers)")
            if unknown := sorted({f for f in vector if f not in g}):
                raise ValueError(f"mix_n_match[{i}] uses {unknown}, which are not among granularities={g}")

    @property
    def loss_weights(self) -> list[float]:
        return [float(w) for w in self.weights] or [1.0] * len(self.granularities)

    def units(self, fraction: float) -> int:
        """Hidden units of the FFN at a granularity (the config check makes it whole)."""
        return round(fraction * self.ffn_hidden_dim)

    def submodels(self) -> list[tuple[str, list[int]]]:
        """(name, per-layer FFN widths) of every submodel evaluation reports: each granularity, then each
        Mix'n'Match vector."""
        uniform = [(f"g{f:g}", [self.units(f)] * self.n_layers) for f in self.granularities]
        return uniform + [(f"mix{i}", [self.units(f) for f in vector]) for i, vector in enumerate(self.mix_n_match)]


def nested_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                  runs: list[tuple[int, int]], hidden: int) -> torch.Tensor:
    """w2[:, :k] (silu(w1[:k] x) * w3[:k] x) for each run of (rows, width) of x [rows, ..., dim]. `hidden` is
    the full width; the weights may hold a share of the units (tensor parallelism: w1 [hidden/tp, dim]), of
    which the first width/hidden are the rank's share of the width's prefix (models/matformer/parallelize.py)."""
    outputs = []
    for rows, width in zip(x.split([n for n, _ in runs]), (w for _, w in runs)):
        k = width * w1.shape[0] // hidden
        outputs.append(F.linear(F.silu(F.linear(rows, w1[:k])) * F.linear(rows, w3[:k]), w2[:, :k]))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class NestedSwiGLU(nn.Module):
    """The Llama feed-forward whose hidden units nest: a run of rows uses the first `width` of them.
    `compute` is nested_swiglu; tensor parallelism swaps in its local-shard form."""

    def __init__(self, dim: int, hidden_dim: int, init_std: float, out_std: float):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.w1 = Linear(dim, hidden_dim, init_std)
        self.w3 = Linear(dim, hidden_dim, init_std)
        self.w2 = Linear(hidden_dim, dim, out_std)
        self.compute = nested_swiglu

    def forward(self, x: torch.Tensor, runs: list[tuple[int, int]] | None = None) -> torch.Tensor:
        runs = runs or [(x.shape[0], self.hidden_dim)]
        # runs and hidden by keyword: tensor parallelism's local_map maps only the tensors (positional)
        return self.compute(x, self.w1.weight, self.w3.weight, self.w2.weight, runs=runs, hidden=self.hidden_dim)


def width_runs(ffn_widths: torch.Tensor) -> list[tuple[int, list[int]]]:
    """(rows, per-layer widths) of each run of consecutive rows of ffn_widths [rows, n_layers] that share a submodel."""
    vectors, counts = torch.unique_consecutive(ffn_widths, dim=0, return_counts=True)
    return list(zip(counts.tolist(), vectors.tolist()))


class MatFormer(Decoder):
    def __init__(self, cfg: MatFormerConfig):
        super().__init__(cfg, Embedding(cfg.vocab_size, cfg.dim, cfg.init_std),
                         {str(i): TransformerBlock(RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg),
                                                   RMSNorm(cfg.dim, cfg.norm_eps),
                                                   NestedSwiGLU(cfg.dim, cfg.ffn_hidden_dim, cfg.init_std, cfg.out_std))
                          for i in range(cfg.n_layers)},
                         RMSNorm(cfg.dim, cfg.norm_eps), Linear(cfg.dim, cfg.vocab_size, cfg.init_std),
                         cfg.tie_embeddings)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, ffn_widths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (see Decoder.forward); row b runs the submodel whose layer l has ffn_widths[b, l]
        hidden units (None: every row the full model). A pipeline stage takes and returns hidden states."""
        runs = width_runs(ffn_widths) if ffn_widths is not None else None
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for name, layer in self.layers.items():
            layer_runs = [(rows, widths[int(name)]) for rows, widths in runs] if runs is not None else None
            h = layer(h, positions, document_ids=document_ids, runs=layer_runs)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h


def matmul_flops_per_token(cfg: MatFormerConfig, widths: list[int]) -> float:
    """Training FLOPs (3x forward, 2 per weight) per token of the submodel with these per-layer FFN widths,
    attention's token mixing left out."""
    attn_weights = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    weights = cfg.n_layers * attn_weights + sum(3 * cfg.dim * w for w in widths) + cfg.dim * cfg.vocab_size
    return 3 * 2 * weights


def flops_per_token(cfg: MatFormerConfig, seq_len: int) -> float:
    """Training FLOPs per token of the data. joint: every granularity's pass (a token of data runs through each);
    sampled: the expectation over the draw (exact for the weights a step runs only on average).

    Attention mixing is counted once here, for a whole causal row: the trainer adds what the batch really
    attends beyond that at flops_per_attention_pair (a joint batch holds each row once per granularity,
    launcher/metrics.py: training_flops), which makes the joint count exact."""
    widths = [[cfg.units(f)] * cfg.n_layers for f in cfg.granularities]
    per_pass = [matmul_flops_per_token(cfg, w) for w in widths]
    if cfg.mode == "joint":
        matmuls = sum(per_pass)
    else:
        weights = cfg.loss_weights
        matmuls = sum(w * f for w, f in zip(weights, per_pass)) / sum(weights)
    return matmuls + flops_per_attention_pair(cfg) * (seq_len + 1) / 2
