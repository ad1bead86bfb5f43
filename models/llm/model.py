"""Llama-style decoder: plain single-device PyTorch. It knows nothing of meshes or shards."""
from dataclasses import dataclass, field

import torch
from torch import nn

from models.common.attention import CoreAttention
from models.common.decoder import Decoder, TransformerBlock
from models.common.linear import Embedding, Linear, Projection
from models.common.mlp import SwiGLU, swiglu_hidden_dim
from models.common.norms import RMSNorm
from models.common.rope import apply_rope, rope_angles
from models.common.sizes import check_sizes


@dataclass
class LLMConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (plain multi-head attention)
    vocab_size: int = 0  # 0: taken from the tokenizer
    multiple_of: int = 64
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    scaled_residual_init: bool = True  # output projections get std / sqrt(2 * n_layers) (GPT-2)
    # FFN hidden size of each layer (e.g. a MatFormer submodel, models/matformer/extract.py); empty: every layer
    # ffn_hidden_dim (Llama's rule from dim, multiple_of and ffn_dim_multiplier).
    ffn_hidden_dims: list[int] = field(default_factory=list)

    def __post_init__(self):
        check_sizes(self, positive=("dim", "n_layers", "n_heads", "multiple_of"),
                    non_negative=("n_kv_heads", "vocab_size"))
        if self.ffn_hidden_dims and type(self) is not LLMConfig:
            raise ValueError(f"ffn_hidden_dims (per-layer FFN sizes) is an option of the llm family; every FFN of a "
                             f"{type(self).__name__} has ffn_hidden_dim units (from dim, multiple_of, ffn_dim_multiplier)")
        if self.ffn_hidden_dims and (len(self.ffn_hidden_dims) != self.n_layers or any(
                isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.ffn_hidden_dims)):
            raise ValueError(f"ffn_hidden_dims={self.ffn_hidden_dims} must be {self.n_layers} positive integers "
                             f"(one per layer, model.n_layers) or empty")

    @property
    def model_vocab_size(self) -> int:
        """Rows of the embedding and the output head: the tokenizer's vocab_size, plus the tokens a family adds
        (SOLO's image markup)."""
        return self.vocab_size

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:  # dims of each head that RoPE rotates
        return self.head_dim

    @property
    def ffn_hidden_dim(self) -> int:
        return swiglu_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def layer_ffn_dims(self) -> list[int]:
        """The FFN hidden size of each layer."""
        return list(self.ffn_hidden_dims) or [self.ffn_hidden_dim] * self.n_layers

    @property
    def out_std(self) -> float:
        """Initial std of the projections that write into the residual stream (GPT-2's scaling)."""
        return self.init_std / (2 * self.n_layers) ** 0.5 if self.scaled_residual_init else self.init_std


class Attention(nn.Module):
    """Causal softmax attention with RoPE on the first `cfg.rotary_dim` dims of each head. `projection`
    builds wq, wk, wv and `output_projection` (default: the same) wo."""

    def __init__(self, cfg: LLMConfig, projection: Projection = Linear, output_projection: Projection | None = None):
        super().__init__()
        self.head_dim, self.rotary_dim, self.rope_theta = cfg.head_dim, cfg.rotary_dim, cfg.rope_theta
        self.wq = projection(cfg.dim, cfg.n_heads * cfg.head_dim, cfg.init_std)
        self.wk = projection(cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std)
        self.wv = projection(cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std)
        self.wo = (output_projection or projection)(cfg.n_heads * cfg.head_dim, cfg.dim, cfg.out_std)
        self.core_attention = CoreAttention()

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        # -1 instead of a head count: under tensor parallelism each rank holds a slice of heads.
        q = self.wq(x).unflatten(-1, (-1, self.head_dim))
        k = self.wk(x).unflatten(-1, (-1, self.head_dim))
        v = self.wv(x).unflatten(-1, (-1, self.head_dim))
        # Angles from the sequence as attention sees it: under sequence parallelism the block's
        # input is a shard, gathered only on the way into wq/wk/wv.
        if positions is None:
            positions = torch.arange(q.shape[1], device=q.device).unsqueeze(0)
        cos, sin = rope_angles(positions, self.rotary_dim, self.rope_theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.wo(self.core_attention(q, k, v, document_ids=document_ids).flatten(-2))


class Transformer(Decoder):
    """`projection` builds every projection of the blocks (attention and feed-forward); the embedding
    and the output head stay linear."""

    def __init__(self, cfg: LLMConfig, projection: Projection = Linear):
        super().__init__(cfg, Embedding(cfg.model_vocab_size, cfg.dim, cfg.init_std),
                         {str(i): TransformerBlock(RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg, projection),
                                                   RMSNorm(cfg.dim, cfg.norm_eps),
                                                   SwiGLU(cfg.dim, hidden, cfg.init_std, cfg.out_std, projection))
                          for i, hidden in enumerate(cfg.layer_ffn_dims())},
                         RMSNorm(cfg.dim, cfg.norm_eps), Linear(cfg.dim, cfg.model_vocab_size, cfg.init_std),
                         cfg.tie_embeddings)


def flops_per_attention_pair(cfg: LLMConfig) -> float:
    """Training FLOPs (3x forward) of one attended (query, key) pair in every layer: the score and the
    value mix, 2 * 2 * n_heads * head_dim forward."""
    return 3 * cfg.n_layers * 4 * cfg.n_heads * cfg.head_dim


def flops_per_token(cfg: LLMConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token, counted exactly.

    Matmuls: 2 FLOPs per weight per token (embedding lookup is free, the output head is not).
    Attention: flops_per_attention_pair per (query, key) pair, and a causal query at position t sees
    t + 1 keys, so the mean context is (seq_len + 1) / 2 (packed documents see fewer: the trainer
    corrects by the pairs a batch really attends, launcher/metrics.py: training_flops).
    """
    d, hd = cfg.dim, cfg.head_dim
    attn_weights = d * hd * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    matmul_weights = (cfg.n_layers * attn_weights + sum(3 * d * ffn for ffn in cfg.layer_ffn_dims())
                      + d * cfg.model_vocab_size)
    return 3 * 2 * matmul_weights + flops_per_attention_pair(cfg) * (seq_len + 1) / 2
