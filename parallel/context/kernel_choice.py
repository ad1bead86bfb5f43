"""Choosing a block kernel by name for a device (see kernels.py for the interface)."""
import torch

from parallel.context.flash_attn_kernel import FlashAttnKernel, flash_attn_available, flash_attn_import_error
from parallel.context.kernels import BlockKernel, CpuFlashKernel, MathKernel

KERNEL_NAMES = ("auto", "math", "cpu_flash", "flash_attn")


def get_kernel(name: str, device: torch.device) -> BlockKernel:
    """The kernel called `name` for tensors on `device`; "auto" is cpu_flash on CPU and flash_attn on CUDA.

    Nothing falls back silently: a kernel that cannot run here is an error naming the alternatives.
    """
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown attention kernel {name!r}; valid kernels: {', '.join(KERNEL_NAMES)}")
    if name == "auto":
        name = "flash_attn" if device.type == "cuda" else "cpu_flash"
    if name == "math":
        return MathKernel()
    if name == "cpu_flash":
        if device.type != "cpu":
            raise ValueError(f"the cpu_flash kernel runs on CPU tensors, got {device}; use kernel 'flash_attn' "
                             "or 'math'")
        return CpuFlashKernel()
    if device.type != "cuda":
        raise ValueError(f"the flash_attn kernel runs on CUDA tensors, got {device}; use kernel 'cpu_flash' or 'math'")
    if not flash_attn_available():
        raise ValueError(f"the flash_attn kernel needs flash-attn's kernels, which do not import "
                         f"({flash_attn_import_error()}); install shardwright[gpu] (flash-attn built for this torch "
                         f"and CUDA) or choose kernel 'math'")
    return FlashAttnKernel()
