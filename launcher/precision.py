"""Which dtype a run computes in (train.mixed_precision), and what the log says about it on CPU.

On CUDA `auto` is bf16. On CPU `auto` stays fp32: CPU runs are where layouts are checked against each other to
fp32 rounding, and whether bf16 is fast depends on the CPU. With native bf16 instructions (AVX512-BF16 or AMX,
as oneDNN detects them) bf16 matmuls run faster than fp32; without them PyTorch emulates bf16 and a step is an
order of magnitude slower (benchmarks/bf16_cpu.py measures both). The log says which CPU this is either way,
and warns when bf16 is asked for on a CPU that would emulate it.
"""
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # compute dtypes by the names configs and devices.yaml use


def cpu_has_native_bf16() -> bool:
    """oneDNN's own test (the one PyTorch's CPU bf16 kernels go by)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_precision(setting: str, device: torch.device) -> tuple[bool, str | None]:
    """(compute in bf16?, a line for the log or None) for train.mixed_precision = auto | bf16 | fp32."""
    if device.type != "cpu":
        return setting in ("auto", "bf16"), None
    isa = torch.backends.cpu.get_cpu_capability()
    native = cpu_has_native_bf16()
    if setting == "bf16" and not native:
        return True, (f"warning: train.mixed_precision=bf16 on a CPU without native bf16 instructions ({isa}): "
                      "PyTorch emulates bf16 matmuls here, many times slower than fp32 (benchmarks/bf16_cpu.py); "
                      "use train.mixed_precision=fp32 on this machine")
    if setting == "bf16":
        return True, f"bf16 on CPU: this CPU has native bf16 instructions ({isa})"
    if setting == "auto":
        hint = ("it has native bf16 instructions: train.mixed_precision=bf16 trains faster (1.3x at the tiny configs' "
                "size: docs/performance.md), not exactly" if native else
                "it has no native bf16 instructions (bf16 would be emulated, far slower)")
        return False, f"fp32: train.mixed_precision=auto keeps CPU runs in fp32 (this CPU: {isa}; {hint})"
    return False, None
