"""train.mixed_precision: what `auto` resolves to, and what the log says about the CPU's bf16 support."""
import pytest
import torch

import launcher.precision
from launcher.precision import choose_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [False, True])
def test_auto_is_fp32_on_cpu_and_says_whether_the_cpu_has_native_bf16(monkeypatch, native):
    monkeypatch.setattr(launcher.precision, "cpu_has_native_bf16", lambda: native)
    bf16, note = choose_precision("auto", CPU)
    assert bf16 is False
    assert ("has native bf16" in note) is native and ("no native bf16" in note) is (not native)


def test_bf16_on_a_cpu_that_emulates_it_is_obeyed_with_a_warning(monkeypatch):
    monkeypatch.setattr(launcher.precision, "cpu_has_native_bf16", lambda: False)
    bf16, note = choose_precision("bf16", CPU)
    assert bf16 is True and note.startswith("warning:") and "train.mixed_precision=fp32" in note
    monkeypatch.setattr(launcher.precision, "cpu_has_native_bf16", lambda: True)
    bf16, note = choose_precision("bf16", CPU)
    assert bf16 is True and not note.startswith("warning:")


@pytest.mark.parametrize("setting, expected", [("auto", True), ("bf16", True), ("fp32", False)])
def test_gpu_precision_needs_no_note(setting, expected):
    assert choose_precision(setting, CUDA) == (expected, None)


def test_fp32_is_fp32_without_a_note():
    assert choose_precision("fp32", CPU) == (False, None)

