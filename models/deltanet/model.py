"""DeltaNet (Yang et al. 2024, fla's `DeltaNet` layer): plain single-device PyTorch.

The model is the Llama-style decoder of models/llm with the attention of each block replaced by a
DeltaNet layer (except at `attention_layers`, which keep the LLM's softmax Attention: a hybrid).
The DeltaNet layer, per token x [B, T, dim]:

    q, k, v = silu(conv_q(W_q x)), silu(conv_k(W_k x)), silu(conv_v(W_v x))   short causal depthwise convs
    q, k    = per-head L2 normalization                                      heads of head_dim
    beta    = sigmoid(W_b x) per head (x 2 with allow_neg_eigval)
    o       = delta_rule(q, k, v, beta)                                      models/deltanet/ops
              (mixer_rule: linear — plain linear attention S += k v^T instead, no beta: the baseline)
    o       = RMSNorm_head(o)  (x silu(W_g x) with use_gate)
    out     = W_o o

Parallel plans replace pieces from outside (models/deltanet/parallelize.py): `core_mixer` (the
delta rule or linear attention) becomes the context-parallel state-passing mixer, and each ShortConvolution's `halo`
gets the previous cp rank's last kernel_size - 1 tokens.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from models.common.linear import Linear
from models.common.norms import RMSNorm
from models.common.sizes import check_sizes
from models.deltanet.ops import apply_mixer_rule
from models.llm.model import LLMConfig, Transformer
from models.llm.model import flops_per_attention_pair as llm_flops_per_attention_pair
from models.llm.model import flops_per_token as llm_flops_per_token
from models.spec import execution_field


@dataclass
class DeltaNetConfig(LLMConfig):
    conv_size: int = 4  # short causal depthwise convolution on q, k, v; 0 or 1: none
    use_gate: bool = False  # output norm gated by silu(W_g x)
    allow_neg_eigval: bool = False  # beta in (0, 2) instead of (0, 1)
    norm_eps: float = 1e-5
    # How to compute, not what: a checkpoint resumes across a change of these.
    chunk_size: int = execution_field(64)  # delta-rule chunk length (chunked backend)
    backend: str = execution_field("auto")  # delta-rule backend: auto | chunked | recurrent | fla (models/deltanet/ops)
    # delta | linear: plain linear attention S_t = S_{t-1} + k_t v_t^T (no beta, no erase) with
    # everything else the same, the baseline the delta rule is compared with (benchmarks/deltanet.py)
    mixer_rule: str = "delta"
    attention_layers: list[int] = field(default_factory=list)  # hybrid: these layers keep softmax attention

    def __post_init__(self):
        super().__post_init__()
        check_sizes(self, positive=("chunk_size",), non_negative=("conv_size",))
        self.attention_layers = list(self.attention_layers)


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution over the sequence of x [B, T, C] (no bias), then SiLU.

    weight [C, K]: channel c at token t sees tokens t-K+1 .. t. The tokens before the first come
    from `halo(x)` ([B, K-1, C], the previous context-parallel rank's last tokens) when a parallel
    plan sets it, else zeros. With document_ids [B, T] a tap counts only where it reads a token of
    the same document (ids are distinct per document in a row, and global across cp ranks: the halo
    brings the previous rank's last ids along with its tokens). The weight starts uniform(+-1/sqrt(K)),
    nn.Conv1d's default bound for a depthwise kernel.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.halo: Callable[[torch.Tensor], torch.Tensor] | None = None

    def init_parameter(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        bound = self.kernel_size ** -0.5
        full.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        # Under tensor parallelism the weight is a DTensor sharded on channels like x (see
        # parallelize.py); its local shard is what this rank's channels use. Computed in at least fp32 and
        # returned in x's dtype: under autocast the fp32 weight would otherwise hand the bf16 activations on as
        # fp32 (and the delta rule would miss fla's kernels).
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        K, T = self.kernel_size, x.shape[1]
        before = self.halo(x) if self.halo is not None else x.new_zeros(x.shape[0], K - 1, x.shape[2])
        padded = torch.cat([before.to(x.dtype), x], dim=1).to(torch.promote_types(x.dtype, weight.dtype))
        if document_ids is None:
            return F.silu(sum(padded[:, i:i + T] * weight[:, i] for i in range(K))).to(x.dtype)
        # Ids of the K-1 tokens before the first; without a halo those tokens are zeros, any id will do.
        before_ids = (self.halo(document_ids.unsqueeze(-1)).squeeze(-1) if self.halo is not None
                      else document_ids[:, :1].expand(-1, K - 1))
        ids = torch.cat([before_ids, document_ids], dim=1)
        return F.silu(sum(padded[:, i:i + T] * weight[:, i] * (ids[:, i:i + T] == document_ids).unsqueeze(-1)
                          for i in range(K))).to(x.dtype)


class MixerRule(nn.Module):
    """The state update (the delta rule, or linear attention) as a module, so that context
    parallelism can swap it (like CoreAttention). beta is None for linear attention."""

    def __init__(self, rule: str = "delta", backend: str = "auto", chunk_size: int = 64):
        super().__init__()
        self.rule, self.backend, self.chunk_size = rule, backend, chunk_size

    def forward(self, q, k, v, beta, initial_state=None, document_ids=None):
        return apply_mixer_rule(self.rule, q, k, v, beta, initial_state, chunk_size=self.chunk_size,
                                backend=self.backend, document_ids=document_ids)[0]

    def extra_repr(self) -> str:
        return f"rule={self.rule}, backend={self.backend}, chunk_size={self.chunk_size}"


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (fla's l2norm): in at least fp32, returned in x's dtype (CUDA
    autocast computes pow, sum and rsqrt in fp32 and would otherwise hand the delta rule fp32 q and k)."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return (wide * torch.rsqrt(wide.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class DeltaNetLayer(nn.Module):
    """The DeltaNet token mixer; forward(x, positions, document_ids) like the LLM's Attention
    (positions unused). document_ids [B, T] (None: one document per row) keep every document to
    itself: the short convs do not reach across a boundary and the mixer rule restarts its state.
    With mixer_rule "linear" the same layer without beta (b_proj is None)."""

    def __init__(self, cfg: DeltaNetConfig):
        super().__init__()
        d, H, hd = cfg.dim, cfg.n_heads, cfg.head_dim
        self.head_dim, self.allow_neg_eigval = hd, cfg.allow_neg_eigval
        std = cfg.init_std
        self.q_proj = Linear(d, H * hd, std)
        self.k_proj = Linear(d, H * hd, std)
        self.v_proj = Linear(d, H * hd, std)
        self.b_proj = Linear(d, H, std) if cfg.mixer_rule == "delta" else None
        self.g_proj = Linear(d, H * hd, std) if cfg.use_gate else None
        conv = cfg.conv_size > 1
        self.q_conv = ShortConvolution(H * hd, cfg.conv_size) if conv else None
        self.k_conv = ShortConvolution(H * hd, cfg.conv_size) if conv else None
        self.v_conv = ShortConvolution(H * hd, cfg.conv_size) if conv else None
        self.o_norm = RMSNorm(hd, cfg.norm_eps)  # one gain over head_dim, shared by the heads
        self.o_proj = Linear(H * hd, d, cfg.out_std)
        self.core_mixer = MixerRule(cfg.mixer_rule, cfg.backend, cfg.chunk_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        def branch(proj, conv):
            y = proj(x)
            return conv(y, document_ids) if conv is not None else F.silu(y)

        # -1 instead of a head count: under tensor parallelism each rank holds a slice of heads.
        q = l2_normalize(branch(self.q_proj, self.q_conv).unflatten(-1, (-1, self.head_dim)))
        k = l2_normalize(branch(self.k_proj, self.k_conv).unflatten(-1, (-1, self.head_dim)))
        v = branch(self.v_proj, self.v_conv).unflatten(-1, (-1, self.head_dim))
        beta = self.b_proj(x).sigmoid() if self.b_proj is not None else None
        if self.allow_neg_eigval:
            beta = beta * 2
        o = self.o_norm(self.core_mixer(q, k, v, beta, document_ids=document_ids))
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x).unflatten(-1, (-1, self.head_dim)))
        return self.o_proj(o.flatten(-2))


class DeltaNet(Transformer):
    """The LLM's decoder with DeltaNet mixers; same forward (tokens or hidden states, positions=None),
    same parameter names outside the mixers, same pipeline split."""

    def __init__(self, cfg: DeltaNetConfig):
        super().__init__(cfg)
        for name, block in self.layers.items():
            if int(name) not in cfg.attention_layers:
                block.attention = DeltaNetLayer(cfg)


def mixer_rule_flops(cfg: DeltaNetConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token per head of the chunked mixer rule as models/deltanet/ops runs
    it (chunk C = min(chunk_size, seq_len), head dims dk = dv = D; a sequence that is not a multiple
    of C runs its last chunk zero-padded to C). The delta rule, per chunk:

        A = (beta K) K^T          2 C^2 D        the unit-triangular solve on [C, 2D]   C (C - 1) 2D
        K^T [W | U]               2 C D 2D       the chunk scan S <- M S + E            2 D^3
        P = Q K^T                 2 C^2 D        (Q - P W) S, P W, P U                  2 C D^2 + 4 C^2 D

    (the solve: C (C - 1) / 2 multiply-adds per right-hand column, counted at 2 FLOPs each like a
    matmul). Linear attention: K^T V 2 C D^2, Q S 2 C D^2, P = Q K^T 2 C^2 D, P V 2 C^2 D (the
    cumsum of the chunk states is not a matmul). tests/unit/test_flops.py measures all of it.
    """
    C, D = min(cfg.chunk_size, seq_len), cfg.head_dim
    n_chunks = -(-seq_len // C)
    if cfg.mixer_rule == "linear":
        per_chunk = 4 * C * D * D + 4 * C * C * D
    else:
        per_chunk = 8 * C * C * D + 2 * C * (C - 1) * D + 6 * C * D * D + 2 * D ** 3
    return n_chunks * per_chunk / seq_len


def flops_per_attention_pair(cfg: DeltaNetConfig) -> float:
    """The LLM's count over the softmax attention layers only (a hybrid's); DeltaNet layers attend no pairs."""
    return llm_flops_per_attention_pair(cfg) * len(cfg.attention_layers) / cfg.n_layers


def flops_per_token(cfg: DeltaNetConfig, seq_len: int) -> float:
    """Training FLOPs (3x forward) per token: the LLM's count with each DeltaNet layer's attention
    weights and score pairs replaced by its projections, short convs and mixer rule."""
    n_delta = cfg.n_layers - len(cfg.attention_layers)
    d, H, hd = cfg.dim, cfg.n_heads, cfg.head_dim
    llm_attn_weights = d * hd * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    llm_attn_pairs = 4 * cfg.n_heads * hd * (seq_len + 1) / 2
    beta_weights = d * H if cfg.mixer_rule == "delta" else 0
    delta_weights = d * H * hd * (4 + cfg.use_gate) + beta_weights  # q, k, v, o (+ g), beta
    conv = 2 * cfg.conv_size * 3 * H * hd if cfg.conv_size > 1 else 0
    per_layer = 2 * delta_weights + conv + H * mixer_rule_flops(cfg, seq_len)
    return llm_flops_per_token(cfg, seq_len) + 3 * n_delta * (per_layer - 2 * llm_attn_weights - llm_attn_pairs)
