"""Rotary position embedding from explicit positions.

Positions are an input (not arange(T)) so that a sequence shard can carry its global positions
once context parallelism splits the sequence.
"""
import torch


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [..., T, head_dim // 2] for integer positions [..., T]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, T, H, D] by the angles [B or 1, T, D/2]."""
    x32 = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x32[..., 0], x32[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
