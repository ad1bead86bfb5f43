"""SOLO: one transformer for images and text, plain single-device PyTorch.

The LLM (models/llm/model.py) whose vocabulary gains SOLO's four image-markup tokens (data/images.py:
VisionTokens, right after the tokenizer's ids) and whose input embedding gains a bias-free patch projection
(3 x 32 x 32 -> dim): a `<vpatch>` position is embedded as the `<vpatch>` row plus the projection of its
normalized patch. `patches` [B, T, 3072] holds each token's patch, zeros at every other token, so the dense
projection adds nothing there. No vision encoder, no 2-D positions: the LLM's 1-D RoPE.

Parameter names are the LLM's plus `patch_embeddings.weight` (reference: SOLO's
modeling_solo.py::MultimodalMistralModel.forward, model-families.md section 5).
"""
from dataclasses import dataclass

import torch

from data.images import PATCH_VALUES, VisionTokens
from models.common.linear import Linear
from models.llm.model import LLMConfig, Transformer
from models.llm.model import flops_per_token as llm_flops_per_token


@dataclass
class SOLOConfig(LLMConfig):
    """The LLM's config; vocab_size is the tokenizer's (text) vocabulary, the model has 4 rows more."""

    @property
    def vision(self) -> VisionTokens:
        return VisionTokens.after(self.vocab_size)

    @property
    def model_vocab_size(self) -> int:
        return self.vocab_size + len(self.vision.ids())


class SOLO(Transformer):
    def __init__(self, cfg: SOLOConfig):
        super().__init__(cfg)
        self.patch_embeddings = Linear(PATCH_VALUES, cfg.dim, cfg.init_std)

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab + 4] for tokens [B, T] and their normalized patches [B, T, 3072] (None: text
        only); positions and document_ids as Decoder.forward. A pipeline stage after the first takes (and one
        before the last returns) hidden states, and no patches."""
        if self.tok_embeddings is None:
            return self.from_embeddings(tokens, positions, document_ids)
        h = self.tok_embeddings(tokens)
        if patches is not None:
            h = h + self.patch_embeddings(patches.to(h.dtype))
        return self.from_embeddings(h, positions, document_ids)


def flops_per_token(cfg: SOLOConfig, seq_len: int) -> float:
    """The LLM's count (with the 4 added vocabulary rows) plus the patch projection, run densely on every token:
    2 x 3072 x dim forward and the same again for its weight gradient (patches are data: no input gradient)."""
    return llm_flops_per_token(cfg, seq_len) + 2 * 2 * PATCH_VALUES * cfg.dim
