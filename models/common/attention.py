"""The attention front-end every softmax-attention layer calls.

Layers hand it q, k, v in [B, T, H, D] layout; it returns [B, T, H, D]. Parallel plans replace
the `CoreAttention` module of a layer (context-parallel ring/ulysses, flash-attn) without the
model code knowing.

Packed documents: with `document_ids` [B, T] (0, 1, 2, ... along each row, nondecreasing) a token
attends only to earlier tokens of its own document. Each document is one contiguous segment, so
this runs causal attention per segment (varlen by a loop over segments) rather than building a
dense [T, T] mask: the mask would make CPU SDPA take its slow masked path and hold T^2 elements.

Under torch.compile that loop runs outside the graph (`torch.compiler.disable`), as it runs without compile: its
trip count is the number of documents in the micro-batch, which changes from batch to batch, and dynamo would
otherwise guard on it (and on every segment length) and recompile the block for each new count, past its
recompile limit within a few steps. The rest of the block still compiles, once.
"""
import torch
import torch.nn.functional as F
from torch import nn


def document_segment_lengths(document_ids: torch.Tensor) -> list[int]:
    """The lengths of the documents of every row of document_ids [B, T], rows in order: the segments
    of the rows flattened to B * T tokens."""
    if document_ids.ndim != 2 or (document_ids.diff(dim=1) < 0).any():
        raise ValueError(f"document_ids must be [B, T] and nondecreasing along each row, got shape "
                         f"{tuple(document_ids.shape)}")
    # Offsetting each row past the previous row's ids makes a document of one row never merge with
    # the same id in the next row.
    offsets = torch.arange(document_ids.shape[0], device=document_ids.device).unsqueeze(1) * document_ids.shape[1]
    _, counts = torch.unique_consecutive((document_ids + offsets).flatten(), return_counts=True)
    return counts.tolist()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA of [B, T, H, D] tensors with grouped-query heads, in [B, T, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [B, H, T, D]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


class CoreAttention(nn.Module):
    """Causal scaled-dot-product attention with grouped-query heads (n_kv_heads divides n_heads),
    inside each document when document_ids are given."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        if document_ids is None:
            return causal_attention(q, k, v)
        return document_causal_attention(q, k, v, document_ids)


@torch.compiler.disable(reason="a loop over the micro-batch's documents: their number and lengths vary per batch")
def document_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              document_ids: torch.Tensor) -> torch.Tensor:
    """causal_attention within each document of document_ids [B, T] (varlen: one SDPA per document segment).
    Never traced by torch.compile (see the module's docstring): its Python loop runs once per document."""
    lengths = document_segment_lengths(document_ids)
    segments = zip(*(t.flatten(0, 1).split(lengths) for t in (q, k, v)))
    out = torch.cat([causal_attention(*(t.unsqueeze(0) for t in segment)).squeeze(0) for segment in segments])
    return out.view_as(q)
