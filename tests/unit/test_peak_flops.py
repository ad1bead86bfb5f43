"""The MFU peak is stable: configured, or measured once per machine and cached; a step faster than a
measured peak raises it (said once), so MFU from a measured peak never exceeds 100%."""
import json

import pytest
import torch

from launcher.metrics import PeakFlops, peak_cache_file


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def test_configured_peak_is_used_as_given():
    peak = PeakFlops(torch.device("cpu"), torch.float32, configured=1e9, log=pytest.fail)
    assert (peak.value, peak.how) == (1e9, "run.peak_flops")
    assert peak.mfu(2e9) == 2.0  # a configured figure is the user's: not rewritten
    assert not peak_cache_file().exists()


def test_measured_once_then_cached_and_raised_by_a_faster_step():
    lines = []
    first = PeakFlops(torch.device("cpu"), torch.float32, configured=0, log=lines.append)
    assert "measured now" in first.how
    cached = json.loads(peak_cache_file().read_text())
    assert list(cached.values()) == [first.value]

    second = PeakFlops(torch.device("cpu"), torch.float32, configured=0, log=lines.append)
    assert second.value == first.value and "measured earlier" in second.how  # the same figure, not re-measured

    assert second.mfu(first.value / 2) == 0.5 and not lines
    assert second.mfu(first.value * 3) == 1.0  # never above 100%
    assert second.mfu(first.value * 3) == 1.0 and len(lines) == 1 and "raised" in lines[0]  # said once
    assert list(json.loads(peak_cache_file().read_text()).values()) == [first.value * 3]


def test_a_known_gpu_divides_by_the_planner_s_datasheet_peak_of_its_dtype_and_no_other_gpu_does(monkeypatch):
    """MFU on a GPU the planner has a profile for uses that profile's peak for the run's dtype (one table for
    both); a name not listed exactly (an H100 PCIe is slower than the SXM) falls back to measuring."""
    import launcher.metrics
    from planner.devices import devices

    monkeypatch.setattr(launcher.metrics, "_measure_matmul_flops", lambda device, dtype: 1.0)
    for profile in devices().values():
        assert profile["cuda_names"], profile["name"]
        for cuda_name in profile["cuda_names"]:
            monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: cuda_name)
            for dtype, key in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
                peak = PeakFlops(torch.device("cuda"), dtype, configured=0, log=pytest.fail)
                assert peak.value == profile["peak_tflops"][key] * 1e12 and not peak.measured
                assert f"datasheet {key} peak of {cuda_name}" in peak.how
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    peak = PeakFlops(torch.device("cuda"), torch.bfloat16, configured=0, log=pytest.fail)
    assert peak.measured and peak.value == 1.0
