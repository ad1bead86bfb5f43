import torch
import torch.nn.functional as F

from parallel.tensor_parallel import full_tensor

IGNORE_INDEX = -100


def _token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Token cross entropy of logits [..., vocab] against targets [...], in at least fp32."""
    return F.cross_entropy(logits.flatten(0, -2).to(torch.promote_types(logits.dtype, torch.float32)),
                           targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross entropy (at least fp32) over the targets that are not IGNORE_INDEX.

    The trainer divides by the *global* target count (the family's LossSpec.count), so the loss does not
    depend on how a global batch is split over data-parallel ranks or micro-batches.
    """
    return _token_cross_entropy(logits, targets, "sum")


def cross_entropy_per_row(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross entropy of each row [rows] (at least fp32), for losses that weigh rows. A plain tensor:
    vocab-sharded logits (loss parallelism) give a DTensor, which plain per-row weights cannot multiply; its
    full value is taken differentiably."""
    return full_tensor(_token_cross_entropy(logits, targets, "none")).view(targets.shape).sum(-1)
