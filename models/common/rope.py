"""Rotary position embedding from explicit positions.

Positions are an input (not arange(T)) so that a sequence shard can carry its global positions
once context parallelism splits the sequence.
"""
import torch


def inverse_frequencies(rotary_dim: int, theta: float, dtype: torch.dtype = torch.float32,
                        device: torch.device | None = None) -> torch.Tensor:
    """The rotation speed of each pair of rotated dims, [rotary_dim // 2]: theta ** (-2i / rotary_dim)."""
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=dtype) / rotary_dim)


def rope_angles(positions: torch.Tensor, rotary_dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [..., T, rotary_dim // 2] for integer positions [..., T], in `dtype`
    (at least fp32: angles of long positions lose their precision in bf16)."""
    dtype = torch.promote_types(dtype, torch.float32)
    angles = positions.to(dtype).unsqueeze(-1) * inverse_frequencies(rotary_dim, theta, dtype, positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, T, H, D] by the angles [B or 1, T, R/2]: the first R
    dims of each head rotate, the rest pass unchanged (partial rotary, R < D, as in GPT-NeoX)."""
    rotary = 2 * cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    x_even, x_odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
