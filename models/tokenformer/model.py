"""TokenFormer (Wang et al. 2024): every projection is attention over learned parameter tokens.

Pattention maps x [..., d_in] to [..., d_out] through n key tokens K [n, d_in] and n value tokens
V [n, d_out]:

    A = x K^T                      scores against each parameter token            [..., n]
    O = Theta(A) V                 Theta normalizes over the n parameter tokens:
        l2_norm_gelu  GELU(A * tau / ||A||)          (the reference's choice; tau = sqrt(n))
        gelu_l2_norm  GELU(A) * tau / ||GELU(A)||
        softmax       softmax(A) * tau^2             (tau^2 = n: softmax times n, as the reference)

The layer is the reference's (GPT-NeoX fork, `ParallelTokenformerLayer`): non-parametric LayerNorm
pre-norms, Q/K/V and output projection each a Pattention, causal softmax attention with RoPE on a
fraction of each head's dims, and the FFN one Pattention (its GELU is the only nonlinearity); a
parametric final LayerNorm and tied embeddings. Keys start N(0, init_std), values N(0, 2 / (L sqrt d)).

Growing the model adds parameter tokens (grow.py): zero new keys add nothing when tau is
fixed, because GELU(0) = 0 and the norms over the old tokens do not change, so `*_tau` are config
fields (0: sqrt(n) of the layer's own count, which a grown model must not use).

Theta is written with plain reductions over the last axis (no F.softmax / F.normalize): a DTensor
sharded on that axis (tensor parallelism over parameter tokens, parallelize.py) then gets the global
norm through the all-reduces DTensor inserts, never a rank-local one.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.common.decoder import Decoder, TransformerBlock
from models.common.linear import Embedding, Linear, Projection
from models.common.norms import LayerNorm
from models.common.sizes import check_sizes
from models.llm.model import Attention
from models.spec import execution_field

NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
QKV_TENSOR_PARALLEL = ("tokens", "heads")


@dataclass
class TokenFormerConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    vocab_size: int = 0  # 0: taken from the tokenizer
    # Parameter tokens of each Q, K and V Pattention, of the attention output one, and of the FFN
    # (0: dim, dim, 4 dim as in the reference configs).
    qkv_tokens: int = 0
    proj_tokens: int = 0
    ffn_tokens: int = 0
    normalization: str = "l2_norm_gelu"  # l2_norm_gelu | gelu_l2_norm | softmax
    # The normalization scale of each kind (0: sqrt of its token count). A grown model keeps the
    # scale of the model it grew from, which is what makes growth preserve the function.
    qkv_tau: float = 0.0
    proj_tau: float = 0.0
    ffn_tau: float = 0.0
    rotary_fraction: float = 0.25  # RoPE on this fraction of each head's dims (GPT-NeoX rotary_pct)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02  # embedding and key tokens
    # Tensor parallelism of the Q/K/V Pattentions (how to compute, not what; parallelize.py):
    # tokens: parameter tokens split, partial outputs reduce-scattered to the local heads;
    # heads: key tokens replicated, value tokens split by heads, no forward communication.
    qkv_tensor_parallel: str = execution_field("tokens")

    def __post_init__(self):
        check_sizes(self, positive=("dim", "n_layers", "n_heads"),
                    non_negative=("vocab_size", "qkv_tokens", "proj_tokens", "ffn_tokens"))
        self.qkv_tokens = self.qkv_tokens or self.dim
        self.proj_tokens = self.proj_tokens or self.dim
        self.ffn_tokens = self.ffn_tokens or 4 * self.dim

    @property
    def kv_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def out_std(self) -> float:  # the std Attention hands its output projection: keys start like every key
        return self.init_std

    @property
    def value_std(self) -> float:
        return 2 / (self.n_layers * math.sqrt(self.dim))

    def tau(self, kind: str) -> float:
        """The normalization scale of the `kind` (qkv | proj | ffn) Pattentions."""
        return getattr(self, f"{kind}_tau") or math.sqrt(getattr(self, f"{kind}_tokens"))


def inverse_l2_norm(x: torch.Tensor) -> torch.Tensor:
    """1 / ||x|| over the last axis, [..., 1], summed in at least fp32."""
    squares = x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).sum(-1, keepdim=True)
    return torch.rsqrt(squares.clamp_min(torch.finfo(squares.dtype).tiny)).to(x.dtype)


def normalize_scores(scores: torch.Tensor, normalization: str, tau: float) -> torch.Tensor:
    """Theta(A) over the parameter-token (last) axis; see the module docstring."""
    if normalization == "l2_norm_gelu":
        return F.gelu(scores * (tau * inverse_l2_norm(scores)))
    if normalization == "gelu_l2_norm":
        activated = F.gelu(scores)
        return activated * (tau * inverse_l2_norm(activated))
    if normalization == "softmax":
        exps = (scores - scores.detach().amax(-1, keepdim=True)).exp()
        return exps * (tau ** 2 / exps.sum(-1, keepdim=True))
    raise ValueError(f"unknown Pattention normalization '{normalization}' (one of {', '.join(NORMALIZATIONS)})")


class Pattention(nn.Module):
    """x [..., in_features] -> [..., out_features] by attention over n_tokens parameter tokens."""

    def __init__(self, in_features: int, out_features: int, n_tokens: int, normalization: str, tau: float,
                 key_std: float, value_std: float):
        super().__init__()
        self.key_param_tokens = nn.Parameter(torch.empty(n_tokens, in_features))
        self.value_param_tokens = nn.Parameter(torch.empty(n_tokens, out_features))
        self.normalization, self.tau = normalization, tau
        self.key_std, self.value_std = key_std, value_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = F.linear(x, self.key_param_tokens)
        return normalize_scores(scores, self.normalization, self.tau) @ self.value_param_tokens

    def init_parameter(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        full.normal_(0.0, self.key_std if name == "key_param_tokens" else self.value_std, generator=generator)


def pattentions(cfg: TokenFormerConfig, kind: str) -> Projection:
    """The projection factory of the `kind` Pattentions (keys start N(0, the std they are given))."""
    n_tokens, tau = getattr(cfg, f"{kind}_tokens"), cfg.tau(kind)
    return lambda d_in, d_out, key_std: Pattention(d_in, d_out, n_tokens, cfg.normalization, tau, key_std,
                                                   cfg.value_std)


class TokenFormer(Decoder):
    def __init__(self, cfg: TokenFormerConfig):
        def block() -> TransformerBlock:
            return TransformerBlock(
                LayerNorm(cfg.dim, cfg.norm_eps, affine=False),
                Attention(cfg, pattentions(cfg, "qkv"), pattentions(cfg, "proj")),
                LayerNorm(cfg.dim, cfg.norm_eps, affine=False),
                pattentions(cfg, "ffn")(cfg.dim, cfg.dim, cfg.init_std))

        super().__init__(cfg, Embedding(cfg.vocab_size, cfg.dim, cfg.init_std),
                         {str(i): block() for i in range(cfg.n_layers)}, LayerNorm(cfg.dim, cfg.norm_eps),
                         Linear(cfg.dim, cfg.vocab_size, cfg.init_std), cfg.tie_embeddings)


def pattention_parameters(cfg: TokenFormerConfig) -> int:
    """Parameters of one layer's Pattentions: 2 d (3 n_qkv + n_proj + n_ffn) (no biases, non-parametric norms)."""
    return 2 * cfg.dim * (3 * cfg.qkv_tokens + cfg.proj_tokens + cfg.ffn_tokens)


def flops_per_token(cfg: TokenFormerConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token, counted exactly.

    A Pattention's scores and value mix are two matmuls, 2 FLOPs per parameter per token like a
    linear layer; the normalization is elementwise. The output head (tied or not) is a matmul, the
    embedding a lookup. Token-to-token attention as in the LLM: 4 n_heads head_dim per (query, key)
    pair, a mean causal context of (seq_len + 1) / 2.
    """
    matmul_weights = cfg.n_layers * pattention_parameters(cfg) + cfg.dim * cfg.vocab_size
    attention_pairs = cfg.n_layers * 4 * cfg.n_heads * cfg.head_dim * (seq_len + 1) / 2
    return 3 * (2 * matmul_weights + attention_pairs)
