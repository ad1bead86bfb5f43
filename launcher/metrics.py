"""What a run reports: metrics.jsonl, TensorBoard, a progress bar or plain log lines, a summary.

Only rank 0 writes. MFU needs a peak FLOP/s: on CPU there is no datasheet number, so it is
measured once per machine, cached, and the log says so (PeakFlops).
"""
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from launcher.errors import UserError
from launcher.precision import DTYPES
from planner.devices import DEVICES_FILE, datasheet_peak_flops


class PeakFlops:
    """Peak FLOP/s of one process, the denominator of MFU: run.peak_flops when configured, else a known
    GPU's datasheet figure for the dtype (planner/devices.yaml, the planner's too), else measured: the best of
    several short matmul timings, made once per device, dtype and thread count and kept in peak_flops.json under
    the user's cache dir, so every run on a machine divides by the same figure. A measurement on a busy machine
    comes out low; a step that then achieves more proves it: the measured peak is raised to that rate (and
    cached), said once, so MFU from a measured peak never exceeds 100%. A configured or datasheet peak is kept
    as given."""

    def __init__(self, device: torch.device, dtype: torch.dtype, configured: float, log=print):
        self.log = log
        self.measured = False
        if configured > 0:
            self.value, self.how = configured, "run.peak_flops"
            return
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            dtype_name = next((key for key, value in DTYPES.items() if value == dtype), None)
            peak = datasheet_peak_flops(name, dtype_name) if dtype_name is not None else None
            if peak is not None:
                self.value, self.how = peak, f"datasheet {dtype_name} peak of {name} ({DEVICES_FILE.name})"
                return
        self.measured = True
        self.key = _machine_key(device, dtype)
        cached = _read_peak_cache().get(self.key)
        if cached is not None:
            self.value, self.how = cached, f"{self.key}, measured earlier ({peak_cache_file()})"
        else:
            self.value = _measure_matmul_flops(device, dtype)
            self.how = f"{self.key}, measured now (best of {_TIMINGS} timings) and cached in {peak_cache_file()}"
            _write_peak_cache(self.key, self.value)

    def mfu(self, achieved_flops: float) -> float:
        """achieved / peak, raising a measured peak that `achieved_flops` (one process's) exceeds."""
        if self.measured and achieved_flops > self.value:
            self.log(f"MFU baseline raised from {self.value / 1e9:.1f} to {achieved_flops / 1e9:.1f} GFLOP/s: a step ran "
                     f"faster than the measured peak (measured on a busy machine); cached for later runs")
            self.value = achieved_flops
            _write_peak_cache(self.key, self.value)
        return achieved_flops / self.value


_TIMINGS = 5


def _machine_key(device: torch.device, dtype: torch.dtype) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} {dtype_name}"
    return f"{describe_machine()['cpu']} {dtype_name} with {torch.get_num_threads()} thread(s)"


def _measure_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the fastest of _TIMINGS timings of 1024x1024 matmuls: the fastest is the one least slowed
    by other processes."""
    n, reps = 1024, 4
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(_TIMINGS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


def peak_cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "shardwright" / "peak_flops.json"


def _read_peak_cache() -> dict[str, float]:
    path = peak_cache_file()
    try:
        cache = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # none yet, or damaged: measured again and rewritten
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_peak_cache(key: str, value: float) -> None:
    """Write atomically (ranks of one machine may write at once); the best figure wins."""
    path = peak_cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = _read_peak_cache()
    cache[key] = max(value, cache.get(key, 0.0))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


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


def read_records(path: Path) -> tuple[list[dict], bytes | None]:
    """(records, the last line if it was cut short) of a metrics.jsonl. A process killed while writing leaves an
    unterminated last line; an unreadable line before it is damage, refused with its line number."""
    lines = path.read_bytes().split(b"\n")
    records, torn = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:  # also UnicodeDecodeError
            if number != len(lines):  # only the last line lacks its newline when cut short
                raise UserError(f"{path} line {number} is not a JSON record; repair or delete that line (the "
                                f"records after the step a run resumes from are written again)") from None
            torn = line
    return records, torn


class MetricsWriter:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, tensorboard: bool):
        self.enabled = rank == 0
        self.records: list[dict] = []
        if not self.enabled:
            return
        self.jsonl_path = run_dir / "metrics.jsonl"
        self.bar = None
        self.log_file = open(run_dir / "train.log", "a")
        self._drop_records_after(start_step)  # a resumed run re-logs the steps after its checkpoint
        self.jsonl = open(self.jsonl_path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) \
            if sys.stderr.isatty() else None

    def _drop_records_after(self, step: int) -> None:
        """Keep the records up to `step`; a last line cut short is dropped with a log line."""
        if not self.jsonl_path.exists():
            return
        records, torn = read_records(self.jsonl_path)
        if torn is not None:
            self.info(f"{self.jsonl_path}: dropped its last line, cut short when the run stopped ({len(torn)} bytes, "
                      f"no newline)")
        tmp = self.jsonl_path.with_name(f".{self.jsonl_path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))
        os.replace(tmp, self.jsonl_path)  # a crash here leaves the old file, not part of it

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

    def log(self, record: dict, show: bool, record_it: bool = True) -> None:
        """One logged step (or eval) record: to jsonl and TensorBoard (unless not `record_it`), to the console if
        `show`."""
        if not self.enabled:
            return
        step = record["step"]
        if record_it:
            self.records.append(record)
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.tb is not None:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self.tb.add_scalar(key.replace("_", "/", 1) if key.startswith("eval_") else f"train/{key}",
                                           value, step)
        if "loss" in record and self.bar:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if show:
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
