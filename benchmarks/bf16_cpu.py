"""bf16 against fp32 on this CPU: tokens/s and the loss curve of real training runs, as JSON.

For each case (the tiny config, and torchtitan's llama3 debugmodel size: dim 256, 6 layers, 16 heads), one
`shardwright train` run per precision (train.mixed_precision=fp32 / bf16), each in a fresh process, one
process (FSDP's mixed precision is off at dp=1: bf16 runs under autocast, fp32 master weights and AdamW).
Speed is tokens per step over the median step time after `--warmup` steps; with `--repeats` R, R pairs of
runs, the order alternating (fp32 then bf16, then bf16 then fp32, ...), and the speed ratio is the median of
the pairs' ratios (a shared VM drifts between runs). The loss comparison is the relative difference of the
step-`--steps` losses of the first pair (the issue's bar: within 2%) and the largest relative difference over
the whole curve. The CPU's bf16 support (oneDNN's detection) is recorded: without native bf16 instructions
PyTorch emulates bf16 matmuls and the ratio shows what that costs.

`attention`: causal SDPA forward + backward alone (torch's CPU flash kernel), fp32 against bf16, in ms, over
sequence lengths and head dims (4096 query rows, 8 heads): the part of a step where bf16 can be the slower.

    .venv/bin/python benchmarks/bf16_cpu.py [--steps 50] [--warmup 5] [--repeats 1] [--threads N]
        [--cases tiny,debugmodel] [--out FILE]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from launcher.metrics import describe_machine  # noqa: E402
from launcher.precision import cpu_has_native_bf16  # noqa: E402

LOSS_GOAL = 0.02
CASES = {
    "tiny": [],
    # torchtitan's llama3 "debugmodel" (torchtitan/models/llama3/__init__.py): dim 256, 6 layers, 16 heads, with
    # its training settings (train_configs/debug_model.toml): batch 8, AdamW lr 8e-4, 2 warmup steps, then linear
    # decay to 0 over the last 80% of the steps. Sequences stay at the tiny config's 128 tokens.
    "debugmodel": ["model.dim=256", "model.n_layers=6", "model.n_heads=16", "model.n_kv_heads=16",
                   "train.global_batch_size=8", "train.micro_batch_size=8", "train.lr=8e-4", "train.warmup_steps=2",
                   "train.lr_schedule=wsd", "train.decay_fraction=0.8", "train.min_lr_ratio=0"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/llm/tiny.yaml")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs per case (fresh processes, order alternating)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--out", default="benchmarks/results/bf16_cpu.json")
    args = p.parse_args()
    if not 0 <= args.warmup < args.steps or args.repeats < 1:
        p.error("--warmup must be at least 0 and less than --steps, and --repeats at least 1")
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; known: {sorted(CASES)}")
    return args


def train_run(args, overrides: list[str], precision: str) -> dict:
    """One `shardwright train` in a fresh process: per-step losses and tokens/s from its metrics.jsonl."""
    with tempfile.TemporaryDirectory(prefix="bf16-cpu-") as run_dir:
        sets = [*overrides, f"train.mixed_precision={precision}", f"train.steps={args.steps}", f"run.dir={run_dir}",
                "checkpoint.enabled=false", "run.tensorboard=false", "train.eval_every=0", "train.eval_batches=1",
                "train.sample_prompt=", "run.log_every=1000"]
        command = [sys.executable, "-m", "launcher", "train", args.config, *(a for s in sets for a in ("--set", s))]
        subprocess.run(command, check=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
                       stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    return {"losses": [r["loss"] for r in steps],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[args.warmup:])}


def attention_ms(seq_len: int, head_dim: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """ms of one causal SDPA forward + backward over 4096 query rows (batch 4096 / seq_len) of 8 heads."""
    q, k, v = (torch.randn(4096 // seq_len, 8, seq_len, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1e3


def attention_cases(threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    cases = []
    for seq_len in (128, 256, 512, 1024):
        for head_dim in (16, 32, 64, 128):
            fp32, bf16 = (attention_ms(seq_len, head_dim, dtype) for dtype in (torch.float32, torch.bfloat16))
            cases.append({"seq_len": seq_len, "head_dim": head_dim, "fp32_ms": fp32, "bf16_ms": bf16,
                          "bf16_over_fp32_time": bf16 / fp32})
            print(f"  attention T={seq_len} D={head_dim}: fp32 {fp32:.1f} ms, bf16 {bf16:.1f} ms "
                  f"({bf16 / fp32:.2f}x the time)", flush=True)
    return cases


def main() -> int:
    args = parse_args()
    results = {}
    for case in args.cases.split(","):
        pairs = []
        for repeat in range(args.repeats):
            runs = {}
            for precision in ("fp32", "bf16") if repeat % 2 == 0 else ("bf16", "fp32"):
                print(f"  {case} {precision}: {args.steps} steps ...", flush=True)
                runs[precision] = train_run(args, CASES[case], precision)
            pairs.append(runs)
        fp32, bf16 = pairs[0]["fp32"], pairs[0]["bf16"]
        ratios = [runs["bf16"]["tokens_per_s"] / runs["fp32"]["tokens_per_s"] for runs in pairs]
        curve = [abs(b - f) / abs(f) for f, b in zip(fp32["losses"], bf16["losses"])]
        results[case] = {"overrides": CASES[case], "fp32_tokens_per_s": [runs["fp32"]["tokens_per_s"] for runs in pairs],
                         "bf16_tokens_per_s": [runs["bf16"]["tokens_per_s"] for runs in pairs],
                         "bf16_over_fp32_speed_each": ratios, "bf16_over_fp32_speed": statistics.median(ratios),
                         "final_loss": {"fp32": fp32["losses"][-1], "bf16": bf16["losses"][-1]},
                         "final_loss_rel_diff": curve[-1], "max_loss_rel_diff": max(curve),
                         "loss_within_goal": curve[-1] <= LOSS_GOAL, "losses": pairs[0]}
        print(f"{case}: bf16/fp32 speed {results[case]['bf16_over_fp32_speed']:.3f}x (pairs: "
              f"{', '.join(f'{r:.3f}' for r in ratios)}), step-{args.steps} loss "
              f"{fp32['losses'][-1]:.4f} (fp32) vs {bf16['losses'][-1]:.4f} (bf16): {curve[-1]:.2%} relative "
              f"(goal <= {LOSS_GOAL:.0%}), largest over the curve {max(curve):.2%}", flush=True)
    attention = attention_cases(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "bf16_cpu", "config": args.config, "steps": args.steps,
                               "warmup": args.warmup, "threads": args.threads, "machine": describe_machine(),
                               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                               "cpu_native_bf16": cpu_has_native_bf16(), "loss_goal": LOSS_GOAL,
                               "cases": results, "attention": attention}, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
