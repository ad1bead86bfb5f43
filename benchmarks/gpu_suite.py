"""What only a GPU can show, in one command on a single H100/H200 (about 8 minutes), as JSON.

Sections (`--sections`, default all):
- `llama`: a 1B-class Llama (dim 2048, 16 layers, 32 heads, 8 KV heads, seq 2048) trained by `shardwright train`
  itself, bf16 (train.mixed_precision=auto on CUDA), without and with torch.compile: median tokens/s and MFU
  after the warm-up steps, MFU against the device's dense bf16 datasheet peak (launcher/metrics.py). The
  embedded corpus' 4096-token vocabulary keeps the data local (the GPU machine has no network); the
  parameter count is the run's own.
- `attention`: the flash_attn block kernel (context parallelism's, parallel/context/flash_attn_kernel.py)
  against the math reference kernel in fp32 on the same inputs: forward output, lse and all three input
  gradients, causal and packed documents. Skipped, and said, when flash-attn is not installed.
- `deltanet`: the delta rule's fla backend (flash-linear-attention's Triton kernel) against the chunked
  PyTorch reference in fp32: output, final state, gradients. Skipped, and said, without fla.
- `moe`: the expert path torch._grouped_mm (bf16) against a loop over experts: relative error of output and
  gradients, and forward+backward time of each (CUDA events, best of several) for balanced and skewed loads.

    python benchmarks/gpu_suite.py [--sections llama,attention,deltanet,moe] [--out FILE]
    python benchmarks/gpu_suite.py --cpu-smoke   # the same code at toy sizes on CPU (no GPU numbers)

`--cpu-smoke` exists so the script's own plumbing is checked on machines without a GPU; its JSON says
`"device": "cpu"` and its numbers measure nothing about GPUs.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from launcher.metrics import describe_machine  # noqa: E402
from models.deltanet.ops import delta_rule, fla_available  # noqa: E402
from models.moe.model import grouped_swiglu, looped_swiglu  # noqa: E402
from parallel.context.flash_attn_kernel import flash_attn_available  # noqa: E402
from parallel.context.kernel_choice import get_kernel  # noqa: E402

SECTIONS = ("llama", "attention", "deltanet", "moe")
LLAMA_1B = ["model.dim=2048", "model.n_layers=16", "model.n_heads=32", "model.n_kv_heads=8", "model.multiple_of=256",
            "train.seq_len=2048", "train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=30"]
LLAMA_SMOKE = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "train.seq_len=64",
               "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=4"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--warmup", type=int, default=10, help="llama: first steps left out (compile warms up in them)")
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU: checks the script, measures nothing")
    p.add_argument("--out", default="benchmarks/results/gpu_suite.json")
    args = p.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device: this suite measures a GPU (use --cpu-smoke to check the script itself on CPU)")
    if args.cpu_smoke:
        args.warmup = 1
    return args


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in fp32."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def llama(args) -> dict:
    """Two real training runs (compile off / on): tokens/s and MFU from their metrics.jsonl."""
    sizes = LLAMA_SMOKE if args.cpu_smoke else LLAMA_1B
    result = {"overrides": sizes}
    for compile_ in (False, True):
        with tempfile.TemporaryDirectory(prefix="gpu-suite-") as run_dir:
            sets = [*sizes, f"train.compile={str(compile_).lower()}", f"run.dir={run_dir}", "checkpoint.enabled=false",
                    "run.tensorboard=false", "train.eval_every=0", "train.eval_batches=1", "train.sample_prompt=",
                    "run.log_every=1000"]
            started = time.perf_counter()
            run = subprocess.run([sys.executable, "-m", "launcher", "train", "configs/llm/tiny.yaml",
                                  *(a for s in sets for a in ("--set", s))], cwd=REPO, capture_output=True, text=True)
            if run.returncode != 0:
                result["compile" if compile_ else "eager"] = {"error": run.stderr[-2000:]}
                continue
            records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        all_steps = [r for r in records if "tokens_per_s" in r]
        steps = all_steps[args.warmup:]
        parameters = re.search(r": ([\d.]+)M parameters", run.stdout)
        result["compile" if compile_ else "eager"] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
            "mfu": statistics.median(r["mfu"] for r in steps), "final_loss": all_steps[-1]["loss"],
            "million_parameters": float(parameters.group(1)) if parameters else None,
            "wall_s": time.perf_counter() - started}
        print(f"  llama {'compile' if compile_ else 'eager'}: {result['compile' if compile_ else 'eager']}", flush=True)
    return result


def attention(args, device) -> dict:
    if not flash_attn_available():
        return {"skipped": "flash-attn is not installed (pip install shardwright[gpu])"}
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
        return {"skipped": "flash-linear-attention (fla) is not installed (pip install shardwright[gpu])"}
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


def moe(args, device) -> dict:
    d, hidden, experts, tokens = (64, 128, 4, 256) if args.cpu_smoke else (2048, 1408, 64, 16384)
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    loads = {"balanced": torch.full((experts,), 1.0), "skewed": torch.linspace(1, 8, experts) ** 2}
    results = {}
    for load, weights in loads.items():
        counts = (weights / weights.sum() * tokens).floor().long()
        counts[0] += tokens - counts.sum()
        counts = (counts // 16 * 16).tolist()  # grouped_mm wants row offsets aligned to 16
        x = torch.randn(sum(counts), d, device=device, generator=g, dtype=dtype)
        w = [torch.randn(experts, *shape, device=device, generator=g, dtype=dtype) * 0.02
             for shape in ((d, hidden), (d, hidden), (hidden, d))]
        outputs = {}
        for name, fn in (("grouped", grouped_swiglu), ("loop", looped_swiglu)):
            xs, ws = x.clone().requires_grad_(), [p.clone().requires_grad_() for p in w]

            def step():
                for tensor in (xs, *ws):
                    tensor.grad = None
                y = fn(xs, counts, *ws)
                y.float().pow(2).sum().backward()
                return y
            y = step()
            outputs[name] = {"values": [y, xs.grad, *(p.grad for p in ws)], "seconds": timed(step, device)}
        names = ["y", "dx", "dw1", "dw3", "dw2"]
        results[load] = {"grouped_s": outputs["grouped"]["seconds"], "loop_s": outputs["loop"]["seconds"],
                         "speedup": outputs["loop"]["seconds"] / outputs["grouped"]["seconds"],
                         "rel_error": {n: rel_error(a, r) for n, a, r in zip(names, outputs["grouped"]["values"],
                                                                            outputs["loop"]["values"])}}
    return {"shape": {"d": d, "hidden": hidden, "experts": experts, "tokens": tokens}, "dtype": str(dtype),
            "grouped_mm": device.type == "cuda" and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16,
            "loads": results}


def main() -> int:
    args = parse_args()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    started = time.perf_counter()
    report = {"benchmark": "gpu_suite", "device": str(device) if args.cpu_smoke else torch.cuda.get_device_name(),
              "cpu_smoke": args.cpu_smoke, "machine": describe_machine(), "torch": torch.__version__, "sections": {}}
    for section in args.sections.split(","):
        print(f"{section} ...", flush=True)
        t0 = time.perf_counter()
        report["sections"][section] = llama(args) if section == "llama" else globals()[section](args, device)
        report["sections"][section]["seconds"] = time.perf_counter() - t0
        print(f"{section}: {json.dumps(report['sections'][section])[:600]}", flush=True)
    report["total_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out} ({report['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
