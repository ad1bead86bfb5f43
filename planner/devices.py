"""Device profiles (devices.yaml): datasheet peaks, memory and links of the GPUs the planner knows, and the names
torch gives them, so that a run's MFU divides by the same datasheet peak the planner predicts with."""
from pathlib import Path

import yaml

DEVICES_FILE = Path(__file__).with_name("devices.yaml")


def devices() -> dict:
    return yaml.safe_load(DEVICES_FILE.read_text())


def datasheet_peak_flops(cuda_name: str, dtype: str) -> float | None:
    """The dense `dtype` peak FLOP/s of the profile whose `cuda_names` holds `cuda_name` (what
    torch.cuda.get_device_name says); None for a device or dtype without one. Names match exactly: an H100 PCIe
    or NVL is not credited the SXM's peak."""
    for profile in devices().values():
        if cuda_name in profile.get("cuda_names", ()) and dtype in profile["peak_tflops"]:
            return profile["peak_tflops"][dtype] * 1e12
    return None
