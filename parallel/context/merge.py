"""Merging partial attention results computed over disjoint sets of keys.

Two partials (out_a, lse_a) and (out_b, lse_b) of the same query rows combine exactly into
  lse = log(e^lse_a + e^lse_b),   out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b.
Written with sigmoid / logaddexp, nothing is exponentiated that can overflow (the
`lse + log(1 + exp(lse_b - lse))` form overflows; ring-flash-attention #30):
  out = out_a - sigmoid(lse_b - lse_a) (out_a - out_b),   lse = logaddexp(lse_a, lse_b).

A row that sees no key of a partial (packed documents) has lse -inf and out 0 there. Merging two
such partials leaves lse -inf and out 0; the sigmoid of (-inf) - (-inf) is NaN, so its weight is
taken as 0 (the other partial's out is 0 too). logaddexp is -inf for two -inf inputs, where the
logsigmoid form would give NaN.
"""
import torch
from torch import Tensor


def merge_partials(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """The merge of (out [B, T, H, D], lse [B, H, T]) with a block's partial of the same rows.

    Computed in out's dtype, which the caller keeps at the accumulation dtype (fp32, or fp64 for
    fp64 inputs); the block's partial may be narrower.
    """
    block_out, block_lse = block_out.to(out.dtype), block_lse.to(lse.dtype)
    weight = torch.sigmoid(block_lse - lse).nan_to_num(nan=0.0).transpose(1, 2).unsqueeze(-1)  # [B, T, H, 1]
    return out - weight * (out - block_out), torch.logaddexp(lse, block_lse)
