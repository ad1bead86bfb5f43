"""What a run reports: metrics.jsonl, TensorBoard, a progress bar or plain log lines, a summary.

Only rank 0 writes. MFU needs a peak FLOP/s: on CPU there is no datasheet number, so it is
measured once with a matmul and the log says so.
"""
import functools
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

# Dense bf16 tensor-core peaks (FLOP/s) by device name fragment.
_GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@functools.cache
def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s of one process on this device and how it was obtained (for the log); measured once
    per process (about half a second on a CPU), however many runs it starts."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in _GPU_PEAKS.items():
            if fragment in name:
                return peak, f"datasheet bf16 peak of {name}"
    n, reps = 1024, 8
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = 2 * n**3 * reps / (time.perf_counter() - start)
    how = f"measured {n}x{n} {str(dtype).removeprefix('torch.')} matmul on {device.type}"
    if device.type == "cpu":
        how += f" with {torch.get_num_threads()} thread(s)"
    return peak, how


def training_flops(flops_per_token: float, flops_per_attention_pair: float | None, seq_len: int, rows: int,
                   attention_pairs: int) -> float:
    """Training FLOPs of `rows` sequences of seq_len tokens whose attention computes `attention_pairs`
    (query, key) pairs per layer and head. flops_per_token counts whole-row causal attention,
    seq_len (seq_len + 1) / 2 pairs a row; packed documents attend fewer, and the difference is
    taken off at flops_per_attention_pair, so MFU counts only the attention that is computed."""
    whole_rows = rows * seq_len * (seq_len + 1) // 2
    if attention_pairs != whole_rows and flops_per_attention_pair is None:
        raise ValueError(f"a batch attends {attention_pairs} pairs, not {whole_rows}, and the model family gives no "
                         "flops_per_attention_pair to count them")
    correction = 0.0 if attention_pairs == whole_rows else flops_per_attention_pair * (attention_pairs - whole_rows)
    return flops_per_token * rows * seq_len + correction


def describe_machine() -> dict:
    """What a measurement ran on (benchmarks put it in their JSON): CPU model, usable cores, RAM,
    OS, Python, torch and its intra-op threads, the load average, and the GPU if there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "usable_cores": len(os.sched_getaffinity(0)),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory on GPU; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class MetricsWriter:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, tensorboard: bool):
        self.enabled = rank == 0
        self.records: list[dict] = []
        if not self.enabled:
            return
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._drop_records_after(start_step)  # a resumed run re-logs the steps after its checkpoint
        self.jsonl = open(self.jsonl_path, "a")
        self.log_file = open(run_dir / "train.log", "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) \
            if sys.stderr.isatty() else None

    def _drop_records_after(self, step: int) -> None:
        if not self.jsonl_path.exists():
            return
        kept = [line for line in self.jsonl_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.jsonl_path.write_text("".join(line + "\n" for line in kept))

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[shardwright] {message}"
        if self.bar:
            self.bar.write(line)
        else:
            print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def log(self, record: dict, show: bool) -> None:
        """One logged step (or eval) record: to jsonl and TensorBoard always, to the console if `show`."""
        if not self.enabled:
            return
        self.records.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key.replace("_", "/", 1) if key.startswith("eval_") else f"train/{key}",
                                       value, step)
        if "loss" in record:
            if self.bar:
                self.bar.update(step - self.bar.n)
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if show:
                self.info(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))
        elif show:
            self.info(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()
        self.log_file.close()


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
