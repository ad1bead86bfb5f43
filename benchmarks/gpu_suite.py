"""What only a GPU can show, in one command on a single H100/H200 (about 8 minutes), as JSON.

Sections (`--sections`, default all, cheapest first so that a short lease returns most of them):
- `moe`: the expert path torch._grouped_mm (bf16) against a loop over experts: relative error of output and
  gradients, forward+backward time of each and of one mm per expert on split rows (CUDA events, best of
  several), and the GEMM kernels the profiler saw, for balanced and skewed loads with row counts aligned
  to 16 and unaligned (what dropless routing hands it).
- `deltanet`: the delta rule's fla backend (flash-linear-attention's Triton kernel) against the chunked
  PyTorch reference in fp32: output, final state, gradients. Skipped, with the import error, without fla.
- `attention`: the flash_attn block kernel (context parallelism's, parallel/context/flash_attn_kernel.py)
  against the math reference kernel in fp32 on the same inputs: forward output, lse and all three input
  gradients, causal and packed documents. Skipped, and said, when flash-attn is not installed.
- `families`: every family's tiny config trained by `shardwright train` on the GPU (bf16 by
  train.mixed_precision=auto, NCCL process group), all at once, so their speeds say nothing: first and
  last loss of each, or its error.
- `llama`: a 1B-class Llama (dim 2048, 16 layers, 32 heads, 8 KV heads, seq 2048) trained by `shardwright train`
  itself, bf16, without and with torch.compile: median tokens/s and MFU after the warm-up steps, MFU against
  the device's dense bf16 datasheet peak (launcher/metrics.py). The embedded corpus' 4096-token vocabulary
  keeps the data local (the GPU machine has no network); the parameter count is the run's own.
- `checkpoint`: benchmarks/async_checkpoint.py on the GPU (a 0.15B Llama, sequence 2048, a save every 80 of 240
  steps, one run per mode): the save call and the steps during a save against the steps before it, sync and
  async, where the async copy is a device-to-host copy and the host cores are free, and how many async saves
  were still being written when the next save came (then their steps overlap: --every too short).
- `tests`: pytest over the tests that skip without CUDA (tests/gpu, the fla and flash-attn kernel tests).

A section that fails records its traceback and the suite goes on; the JSON is rewritten after every
section (a lease that ends mid-run keeps what finished) and the exit status is 1 if any section failed, or
any part of one (a llama run, a family's run, a test). `--budget-s` bounds the training runs and the
checkpoint and tests sections: each gets what is left of it, and one stopped by it keeps its output's tail.

    python benchmarks/gpu_suite.py [--sections moe,deltanet,attention,families,llama,checkpoint,tests]
        [--out FILE]
    python benchmarks/gpu_suite.py --cpu-smoke   # the same code at toy sizes on CPU (no GPU numbers)

`--cpu-smoke` exists so the script's own plumbing is checked on machines without a GPU; its JSON says
`"device": "cpu"` and its numbers measure nothing about GPUs.
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from launcher.metrics import describe_machine  # noqa: E402
from models.deltanet.ops import delta_rule, fla_available, fla_import_error  # noqa: E402
from models.moe.model import grouped_swiglu, looped_swiglu, split_swiglu  # noqa: E402
from parallel.context.flash_attn_kernel import flash_attn_available, flash_attn_import_error  # noqa: E402
from parallel.context.kernel_choice import get_kernel  # noqa: E402

SECTIONS = ("moe", "deltanet", "attention", "families", "llama", "checkpoint", "tests")
# The tests that skip without CUDA (or without fla / flash-attn there).
GPU_TESTS = ["tests/gpu", "tests/unit/test_deltanet_ops.py::test_fla_matches_chunked_on_gpu",
             "tests/unit/test_context_kernels.py::test_flash_attn_kernel_matches_math_kernel"]
FAMILY_CONFIGS = ("llm/tiny", "moe/tiny", "deltanet/tiny", "deltanet/hybrid-tiny", "tokenformer/tiny",
                  "matformer/tiny", "solo/tiny")
# The final eval needs one global batch of distinct valid samples: 8 of 2048 tokens, which the pydoc corpus' valid
# split holds from valid_fraction 0.15 (0.05: 2).
LLAMA_1B = ["model.dim=2048", "model.n_layers=16", "model.n_heads=32", "model.n_kv_heads=8", "model.multiple_of=256",
            "train.seq_len=2048", "train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=30",
            "data.valid_fraction=0.2"]
LLAMA_SMOKE = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "train.seq_len=64",
               "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=4"]
# checkpoint: a 0.15B Llama at the llama section's sequence and batch, a 1.8 GB checkpoint every 80 steps: an
# async save (stage, write, SHA-256: a few seconds) has 80 steps of 0.05-0.07 s to finish before the next one.
CHECKPOINT_SIZES = ["--dim", "1024", "--layers", "12", "--steps", "240", "--every", "80", "--warmup", "5",
                    "--set", "model.n_heads=16", "--set", "model.n_kv_heads=8", "--set", "model.multiple_of=256",
                    "--set", "train.seq_len=2048", "--set", "train.global_batch_size=8",
                    "--set", "train.micro_batch_size=4", "--set", "data.valid_fraction=0.2"]
CHECKPOINT_SMOKE = ["--dim", "64", "--layers", "2", "--steps", "8", "--every", "3", "--warmup", "1"]
QUIET_RUN = ["checkpoint.enabled=false", "run.tensorboard=false", "train.eval_every=0", "train.eval_batches=1",
             "train.sample_prompt=", "run.log_every=1000"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--warmup", type=int, default=10, help="llama: first steps left out (compile warms up in them)")
    p.add_argument("--family-steps", type=int, default=30, help="families: steps each tiny config trains")
    p.add_argument("--budget-s", type=float, default=480, help="training runs are stopped when this much has passed")
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU: checks the script, measures nothing")
    p.add_argument("--out", default="benchmarks/results/gpu_suite.json")
    args = p.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device: this suite measures a GPU (use --cpu-smoke to check the script itself on CPU)")
    if args.cpu_smoke:
        args.warmup, args.family_steps = 1, 3
    args.deadline = time.monotonic() + args.budget_s
    return args


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in fp32."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


OUT_OF_BUDGET = "stopped: the suite's --budget-s ran out"


def time_left(args) -> float:
    """Seconds a subprocess may still run under --budget-s (at least one, so that it starts)."""
    return max(1.0, args.deadline - time.monotonic())


def run_within_budget(args, command: list[str]) -> subprocess.CompletedProcess | dict:
    """`command` run from the repository, or {"error": ...} with its output's tail when --budget-s runs out
    first. It runs in a session of its own so that the timeout kills its whole process group: its own children
    (async_checkpoint's training runs, pytest's) would otherwise outlive it and compete with later sections."""
    run = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        stdout, stderr = run.communicate(timeout=time_left(args))
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        stdout, stderr = run.communicate()  # what it wrote before, kept by the first communicate
        return {"error": f"{OUT_OF_BUDGET}; stdout tail: {stdout[-1500:]}; stderr tail: {stderr[-1500:]}"}
    except KeyboardInterrupt:  # its own session does not get the terminal's ^C
        os.killpg(run.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, run.returncode, stdout, stderr)


def start_training(args, config: str, sets: list[str], run_dir: str) -> subprocess.Popen:
    """`shardwright train configs/<config>.yaml` with `sets` as --set overrides, its metrics in run_dir."""
    sets = [*sets, *QUIET_RUN, f"run.dir={run_dir}"]
    return subprocess.Popen([sys.executable, "-m", "launcher", "train", f"configs/{config}.yaml",
                             *(a for s in sets for a in ("--set", s))], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_training(args, run: subprocess.Popen, run_dir: str) -> tuple[list[dict], str] | dict:
    """(step records of metrics.jsonl, stdout), or {"error": ...} when the run failed or ran out of budget."""
    try:
        stdout, stderr = run.communicate(timeout=time_left(args))
    except subprocess.TimeoutExpired:
        run.kill()
        stdout, stderr = run.communicate()
        return {"error": f"{OUT_OF_BUDGET}; stderr tail: {stderr[-1500:]}"}
    if run.returncode != 0:
        return {"error": f"exit {run.returncode}: {stderr[-3000:]}"}
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "tokens_per_s" in r], stdout


def llama(args, device) -> dict:
    """Two real training runs (compile off / on): tokens/s and MFU from their metrics.jsonl."""
    sizes = LLAMA_SMOKE if args.cpu_smoke else LLAMA_1B
    result = {"overrides": sizes}
    for compile_ in (False, True):
        name = "compile" if compile_ else "eager"
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gpu-suite-") as run_dir:
            run = start_training(args, "llm/tiny", [*sizes, f"train.compile={str(compile_).lower()}"], run_dir)
            outcome = finish_training(args, run, run_dir)
        if isinstance(outcome, dict):
            result[name] = outcome
        else:
            all_steps, stdout = outcome
            steps = all_steps[args.warmup:]
            parameters = re.search(r": ([\d.]+)M parameters", stdout)
            result[name] = {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
                "mfu": statistics.median(r["mfu"] for r in steps), "final_loss": all_steps[-1]["loss"],
                "million_parameters": float(parameters.group(1)) if parameters else None,
                "peak_memory_gib": max(r["mem_peak_gib"] for r in steps),
                "wall_s": time.perf_counter() - started}
        print(f"  llama {name}: {result[name]}", flush=True)
    return result


def families(args, device) -> dict:
    """Every family's tiny config, trained at once on the one device; loss first and last."""
    # bf16 as on the GPU (auto), so that --cpu-smoke runs the same autocast path
    sets = [f"train.steps={args.family_steps}", "train.warmup_steps=2", "train.mixed_precision=bf16"]
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as root:
        runs = {config: (start_training(args, config, sets, f"{root}/{config}"), f"{root}/{config}")
                for config in FAMILY_CONFIGS}
        result = {}
        for config, (run, run_dir) in runs.items():
            outcome = finish_training(args, run, run_dir)
            result[config] = outcome if isinstance(outcome, dict) else {
                "steps": len(outcome[0]), "first_loss": outcome[0][0]["loss"], "last_loss": outcome[0][-1]["loss"]}
            print(f"  {config}: {result[config]}", flush=True)
    return {"steps": args.family_steps, "runs": result,
            "failed": [config for config, outcome in result.items() if "error" in outcome]}


def checkpoint(args, device) -> dict:
    """benchmarks/async_checkpoint.py on this device: step time while a sync / async save runs, one run each."""
    sizes = CHECKPOINT_SMOKE if args.cpu_smoke else CHECKPOINT_SIZES
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        out = Path(tmp) / "async_checkpoint.json"
        run = run_within_budget(args, [sys.executable, "benchmarks/async_checkpoint.py", *sizes, "--repeats", "1",
                                       "--out", str(out)])
        if isinstance(run, dict):
            return run
        if run.returncode != 0:
            return {"error": f"exit {run.returncode}: {run.stderr[-3000:]}"}
        result = json.loads(out.read_text())
    keep = ("save_call_s", "during_save_vs_steps_before_it", "during_save_vs_steps_before_it_each",
            "first_save_vs_steps_before_it", "later_save_vs_steps_before_it", "steps_per_save",
            "saves_in_flight_at_next_save", "added_s_per_save", "median_step_s_without_save",
            "without_save_vs_none_median")
    return {"arguments": sizes, "checkpoint_mb": result["checkpoint_mb"], "goal": result["goal_during_save_vs_none"],
            "none_median_step_s": result["none"]["median_step_s"],
            **{mode: {k: result[mode][k] for k in keep} for mode in ("sync", "async")},
            "async_within_goal": result["async"]["within_goal"],
            "async_writer_process_cpu_s_per_save": result["async"].get("writer_process_cpu_s_per_save")}


def tests(args, device) -> dict:
    """pytest over the GPU-only tests: its summary line, and each test that did not pass."""
    run = run_within_budget(args, [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                                   *GPU_TESTS])
    if isinstance(run, dict):
        return run
    lines = run.stdout.strip().splitlines()
    result = {"exit_code": run.returncode, "summary": lines[-1] if lines else run.stderr[-500:],
              "not_passed": [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))]}
    if run.returncode not in (0, 5):  # 5: no test collected (tests that all skip give 0)
        result["failed"] = [line for line in lines if line.startswith(("FAILED", "ERROR"))] or [result["summary"]]
    return result


def attention(args, device) -> dict:
    if not flash_attn_available():
        return {"skipped": f"flash-attn's kernels do not import: {flash_attn_import_error()} "
                           "(pip install shardwright[gpu])"}
    flash, math = get_kernel("flash_attn", device), get_kernel("math", device)
    g = torch.Generator(device=device).manual_seed(0)
    b, t, h, d = 2, 1024, 8, 128
    cases = {}
    documents = torch.cat([torch.zeros(t // 3), torch.ones(t - t // 3)]).long().to(device).expand(b, t)
    for name, docs in (("causal", None), ("packed documents", documents)):
        q, k, v, dout = (torch.randn(b, t, h, d, device=device, generator=g, dtype=torch.bfloat16) for _ in range(4))
        scale = d ** -0.5
        out, lse = flash.fwd(q, k, v, True, scale, docs, docs)
        grads = flash.bwd(dout, q, k, v, out, lse, True, scale, docs, docs)
        q32, k32, v32, dout32 = (x.float() for x in (q, k, v, dout))
        ref_out, ref_lse = math.fwd(q32, k32, v32, True, scale, docs, docs)
        ref_grads = math.bwd(dout32, q32, k32, v32, ref_out, ref_lse, True, scale, docs, docs)
        cases[name] = {"out": rel_error(out, ref_out), "lse": rel_error(lse, ref_lse),
                       **{f"d{n}": rel_error(a, r) for n, a, r in zip("qkv", grads, ref_grads)}}
    return {"shape_bthd": [b, t, h, d], "dtype": "bf16 vs fp32 reference", "rel_error": cases}


def deltanet(args, device) -> dict:
    if not fla_available():
        return {"skipped": f"flash-linear-attention (fla) is not importable: {fla_import_error()}"}
    g = torch.Generator(device=device).manual_seed(0)
    b, t, h, dk, dv = 2, 2048, 4, 64, 64
    q, k = (torch.nn.functional.normalize(torch.randn(b, t, h, dk, device=device, generator=g), dim=-1)
            for _ in range(2))
    v = torch.randn(b, t, h, dv, device=device, generator=g)
    beta = torch.rand(b, t, h, device=device, generator=g)
    results = {}
    for backend, dtype in (("fla", torch.bfloat16), ("chunked", torch.float32)):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v, beta)]
        o, state = delta_rule(*inputs, backend=backend)
        o.float().pow(2).sum().backward()
        results[backend] = [o, state, *(x.grad for x in inputs)]
    names = ["o", "final_state", "dq", "dk", "dv", "dbeta"]
    return {"shape": [b, t, h, dk, dv], "dtype": "fla bf16 vs chunked fp32",
            "rel_error": {n: rel_error(a, r) for n, a, r in zip(names, results["fla"], results["chunked"])}}


def timed(fn, device, repeats: int = 10) -> float:
    """Best-of-`repeats` seconds of fn() (CUDA events on GPU)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - started)
    return best


def kernel_names(fn, device, top: int = 6) -> list[str]:
    """The device kernels that take most time in one fn() (torch.profiler): which GEMMs ran (a CUTLASS grouped
    GEMM, or one cuBLAS GEMM per expert)."""
    if device.type != "cuda":
        return []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    return [f"{e.key[:120]} x{e.count}" for e in events[:top]]


def expert_pass(fn, x, weights, counts):
    """fn's output and the gradients of x and the weights under loss sum(y^2), and a rerun closure."""
    xs, ws = x.clone().requires_grad_(), [p.clone().requires_grad_() for p in weights]

    def step():
        for tensor in (xs, *ws):
            tensor.grad = None
        y = fn(xs, counts, *ws)
        y.float().pow(2).sum().backward()
        return y
    y = step()
    return [y, xs.grad, *(p.grad for p in ws)], step


def moe(args, device) -> dict:
    d, hidden, experts, tokens = (64, 128, 4, 256) if args.cpu_smoke else (2048, 1408, 64, 16384)
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    w = [torch.randn(experts, *shape, device=device, generator=g, dtype=dtype) * 0.02
         for shape in ((d, hidden), (d, hidden), (hidden, d))]
    names = ["y", "dx", "dw1", "dw3", "dw2"]
    loads = {"balanced": torch.full((experts,), 1.0), "skewed": torch.linspace(1, 8, experts) ** 2}
    results = {}
    for load, weights in loads.items():
        counts = (weights / weights.sum() * tokens).floor().long()
        counts[0] += tokens - counts.sum()
        for aligned in (True, False):
            case_counts = (counts // 16 * 16).tolist() if aligned else (counts - torch.arange(experts) % 7).tolist()
            x = torch.randn(sum(case_counts), d, device=device, generator=g, dtype=dtype)
            grouped, grouped_step = expert_pass(grouped_swiglu, x, w, case_counts)
            loop, loop_step = expert_pass(looped_swiglu, x, w, case_counts)
            _, split_step = expert_pass(split_swiglu, x, w, case_counts)
            case = {"rel_error": {n: rel_error(a, r) for n, a, r in zip(names, grouped, loop)}}
            case["grouped_s"], case["loop_s"] = timed(grouped_step, device), timed(loop_step, device)
            case["split_s"] = timed(split_step, device)
            case["speedup"] = case["loop_s"] / case["grouped_s"]
            case["speedup_vs_split"] = case["split_s"] / case["grouped_s"]
            case["grouped_kernels"] = kernel_names(grouped_step, device)
            results[f"{load}, {'aligned to 16' if aligned else 'unaligned'}"] = case
            print(f"  moe {load} {'aligned' if aligned else 'unaligned'}: {case}", flush=True)
    return {"shape": {"d": d, "hidden": hidden, "experts": experts, "tokens": tokens}, "dtype": str(dtype),
            "grouped_mm": device.type == "cuda" and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16,
            "cases": results}


def section_failed(result: dict) -> bool:
    """Whether a section's result records a failure anywhere in it: an "error" or a non-empty "failed" (llama
    keeps each run's error under the run's name, families each config's)."""
    return "error" in result or bool(result.get("failed")) or any(
        isinstance(value, dict) and section_failed(value) for value in result.values())


def main() -> int:
    args = parse_args()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    started = time.perf_counter()
    report = {"benchmark": "gpu_suite", "device": str(device) if args.cpu_smoke else torch.cuda.get_device_name(),
              "cpu_smoke": args.cpu_smoke, "machine": describe_machine(), "torch": torch.__version__, "sections": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for section in args.sections.split(","):
        print(f"{section} ...", flush=True)
        t0 = time.perf_counter()
        try:
            report["sections"][section] = globals()[section](args, device)
        except Exception:  # the suite's job is to report what broke, then measure the rest
            report["sections"][section] = {"error": traceback.format_exc()}
        if section_failed(report["sections"][section]):
            failed.append(section)
        report["sections"][section]["seconds"] = time.perf_counter() - t0
        report["total_seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"{section}: {json.dumps(report['sections'][section])[:800]}", flush=True)
    print(f"-> {out} ({report['total_seconds']:.0f} s)" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
