"""Packed documents in block attention: which query and key tokens of a block share a document.

Document ids are [B, T] per block side, nondecreasing along each row (0, 1, 2, ... in sequence
order). Every layout keeps each rank's tokens in global order (zigzag's two chunks included), so
inside any block a document is one contiguous run of queries and one of keys: a block is a set of
(query segment, key segment) pairs, one per document present on both sides, exactly what a
varlen kernel takes as cu_seqlens.
"""
import torch
from torch import Tensor


def check_document_ids(document_ids: Tensor, like: Tensor) -> None:
    """document_ids must be [B, T] of the tokens of `like` [B, T, ...], nondecreasing along each row."""
    if document_ids.shape != like.shape[:2]:
        raise ValueError(f"document_ids {tuple(document_ids.shape)} must be [B, T] of the tokens "
                         f"{tuple(like.shape[:2])}")
    if (document_ids.diff(dim=1) < 0).any():
        raise ValueError("document_ids must be nondecreasing along each row (0, 1, 2, ... in sequence order)")


def _row_offsets(q_documents: Tensor, k_documents: Tensor) -> Tensor:
    """Per-row offsets that make ids unique across rows ([B, 1]), so rows flatten into one sequence."""
    stride = int(torch.maximum(q_documents.max(), k_documents.max())) + 1
    return torch.arange(q_documents.shape[0], device=q_documents.device).unsqueeze(1) * stride


def shares_a_document(q_documents: Tensor, k_documents: Tensor) -> bool:
    """Whether any query of a block sees any key of it (some row has a document on both sides)."""
    offsets = _row_offsets(q_documents, k_documents)
    return bool(torch.isin(q_documents + offsets, k_documents + offsets).any())


def shared_document_segments(q_documents: Tensor, k_documents: Tensor) -> list[tuple[int, int, int, int]]:
    """(q_start, q_end, k_start, k_end) of each document present among both a block's queries
    [B, Tq] and keys [B, Tk], in the tokens flattened over rows (B * Tq, B * Tk); documents on one
    side only are left out (their queries see no key of the block)."""
    offsets = _row_offsets(q_documents, k_documents)

    def segments(ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        unique, counts = torch.unique_consecutive((ids + offsets).flatten(), return_counts=True)
        ends = counts.cumsum(0)
        return unique, ends - counts, ends

    q_ids, q_starts, q_ends = segments(q_documents)
    k_ids, k_starts, k_ends = segments(k_documents)
    # Both id lists are sorted, so the shared ids come out in the same order on both sides.
    on_both_q, on_both_k = torch.isin(q_ids, k_ids), torch.isin(k_ids, q_ids)
    return list(zip(q_starts[on_both_q].tolist(), q_ends[on_both_q].tolist(),
                    k_starts[on_both_k].tolist(), k_ends[on_both_k].tolist()))


def visible_pairs(q_documents: Tensor, k_documents: Tensor, causal: bool) -> Tensor:
    """[B, Tq, Tk] bool, True where a query sees a key: same document (and not in the future on a
    causal square block). Built for one block only, for the reference kernel."""
    visible = q_documents.unsqueeze(2) == k_documents.unsqueeze(1)
    if causal:
        visible &= torch.ones(visible.shape[1:], dtype=torch.bool, device=visible.device).tril()
    return visible
