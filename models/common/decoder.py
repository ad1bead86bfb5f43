"""The decoder skeleton every text family shares: embedding -> blocks -> final norm -> head, and the
pre-norm residual block.

A family builds the pieces (its own blocks, norms, head); the forward and the names stay the same,
which is what the shared pipeline split and tensor-parallel plan rely on (models/llm/parallelize.py).
"""
import torch
from torch import nn


class TransformerBlock(nn.Module):
    """A pre-norm residual block: h = x + attention(attention_norm(x), positions, document_ids=...), then
    h + feed_forward(ffn_norm(h), **ffn_kwargs). document_ids travel as a keyword, so tensor-parallel input
    plans (which lay out the positional inputs) leave them as they are; so do ffn_kwargs, a family's further
    inputs of its feed-forward (MatFormer's per-row widths)."""

    def __init__(self, attention_norm: nn.Module, attention: nn.Module, ffn_norm: nn.Module, feed_forward: nn.Module):
        super().__init__()
        self.attention_norm, self.attention = attention_norm, attention
        self.ffn_norm, self.feed_forward = ffn_norm, feed_forward

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None, document_ids: torch.Tensor | None = None,
                **ffn_kwargs) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, document_ids=document_ids)
        return h + self.feed_forward(self.ffn_norm(h), **ffn_kwargs)


class Decoder(nn.Module):
    def __init__(self, cfg, tok_embeddings: nn.Module, layers: dict[str, nn.Module], norm: nn.Module,
                 output: nn.Module, tie_embeddings: bool):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = tok_embeddings
        # A dict keyed by layer index keeps parameter names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict(layers)
        self.norm = norm
        self.output = output
        if tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T] at positions [B, T] (default 0..T-1). With
        document_ids [B, T] (0, 1, 2, ... per row) every token mixes only with its own document.

        A pipeline stage that lacks the embedding takes hidden states [B, T, dim] instead, and one
        that lacks the head returns them (see models/llm/parallelize.py: split_stage).
        """
        return self.from_embeddings(self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens,
                                    positions, document_ids)

    def from_embeddings(self, h: torch.Tensor, positions: torch.Tensor | None,
                        document_ids: torch.Tensor | None) -> torch.Tensor:
        """The blocks, final norm and head (those this stage holds) on embedded inputs h [B, T, dim]: for a
        family that embeds more than tokens (SOLO adds image patches)."""
        for layer in self.layers.values():
            h = layer(h, positions, document_ids=document_ids)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h
