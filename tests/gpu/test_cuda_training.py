"""GPU paths: bf16 mixed precision through FSDP2 and autocast, NCCL. Skipped without CUDA."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, TINY, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("nproc", [1, 2])
def test_bf16_training_loss_falls(tmp_path, data_cache, nproc):
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    sets = [a for o in tiny_overrides(tmp_path / "run", data_cache, "train.steps=30", "train.lr=3e-3")
            for a in ("--set", o)]
    result = subprocess.run([sys.executable, "-m", "launcher", "train", str(TINY), "--nproc-per-node", str(nproc),
                             *sets], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16" in result.stdout and "cuda process" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5
