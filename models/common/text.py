"""The data and loss of a decoder trained on next-token prediction over packed text."""
import torch

from data.build import build_loaders
from models.common.loss import IGNORE_INDEX, cross_entropy_sum
from models.spec import BatchKey, DataSpec, LossSpec, LossTerms

# The loaders (data/loader.py) serve micro-batches with these keys, each [rows, seq_len].
TEXT_KEYS = {
    "tokens": BatchKey(sequence_dim=1, consumer="inputs"),
    "positions": BatchKey(sequence_dim=1, consumer="every_stage"),  # RoPE positions: every layer needs them
    "targets": BatchKey(sequence_dim=1, consumer="loss"),
    # With data.document_mask: 0, 1, 2, ... for the documents of each row (positions then restart at
    # each document); every mixing layer keeps to its document.
    "document_ids": BatchKey(sequence_dim=1, consumer="every_stage"),
}


def prompt_batch(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"tokens": tokens, "positions": torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)}


def token_cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossTerms:
    return LossTerms(cross_entropy_sum(logits, batch["targets"]), {})


def count_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["targets"] != IGNORE_INDEX).sum()


def attention_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Causal (query, key) pairs of a micro-batch's whole rows: L (L + 1) / 2 per document of L tokens
    (a row is one document without document_ids)."""
    tokens = batch["tokens"]
    if "document_ids" not in batch:
        return tokens.shape[0] * tokens.shape[1] * (tokens.shape[1] + 1) // 2
    offsets = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1) * tokens.shape[1]
    _, lengths = torch.unique_consecutive((batch["document_ids"] + offsets).flatten(), return_counts=True)
    return int((lengths * (lengths + 1) // 2).sum())


TEXT_DATA = DataSpec(keys=TEXT_KEYS, build_loaders=build_loaders, prompt_batch=prompt_batch,
                     attention_pairs=attention_pairs)
TOKEN_LOSS = LossSpec(compute=token_cross_entropy, count=count_targets)
