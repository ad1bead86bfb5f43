import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross entropy (at least fp32) and the number of target tokens it covers.

    The trainer divides by the *global* target count, so the loss does not depend on how a
    global batch is split over data-parallel ranks or micro-batches.
    """
    loss_sum = F.cross_entropy(
        logits.flatten(0, -2).to(torch.promote_types(logits.dtype, torch.float32)), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()
