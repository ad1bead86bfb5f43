"""AdamW's step on CPU: torch's fused kernel against its foreach kernels (what build_optimizer used before), as JSON.

For the tiny LLM and torchtitan's llama3 debugmodel size, the parameters of one model (one process, fp32) with
random gradients: the median time of an optimizer step (after 3 warm-up steps) of each implementation, the
order alternating over `--repeats` rounds, and the largest relative difference of the parameters after 5
steps from the same start (the two kernels round differently; a wrong kernel would differ by far more).

    .venv/bin/python benchmarks/optimizer_step.py [--steps 30] [--repeats 3] [--threads N] [--out FILE]
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from launcher.config import load_config  # noqa: E402
from launcher.metrics import describe_machine  # noqa: E402
from launcher.optim import build_optimizer  # noqa: E402
from models import get_model_spec  # noqa: E402

CASES = {"tiny": [], "debugmodel": ["model.dim=256", "model.n_layers=6", "model.n_heads=16", "model.n_kv_heads=16"]}
IMPLEMENTATIONS = ("foreach", "fused")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/llm/tiny.yaml")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds per implementation, the order alternating")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--out", default="benchmarks/results/optimizer_step.json")
    args = p.parse_args()
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be at least 1")
    return args


def optimizer(model: torch.nn.Module, cfg, implementation: str) -> torch.optim.Optimizer:
    """build_optimizer's AdamW (its groups and options) with the given implementation."""
    built = build_optimizer(model, cfg.train)
    groups = [{key: group[key] for key in ("params", "weight_decay", "name")} for group in built.param_groups]
    options = built.defaults
    return torch.optim.AdamW(groups, lr=options["lr"], betas=options["betas"], eps=options["eps"],
                             **{implementation: True})


def model_with_grads(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_model_spec(cfg.model.family).model_cls(cfg.model_config())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def step_ms(cfg, implementation: str, steps: int) -> float:
    model = model_with_grads(cfg)
    opt = optimizer(model, cfg, implementation)
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def params_after(cfg, implementation: str, steps: int = 5) -> list[torch.Tensor]:
    model = model_with_grads(cfg)
    opt = optimizer(model, cfg, implementation)
    for _ in range(steps):
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for case, overrides in CASES.items():
        cfg = load_config(args.config, overrides)
        times = {impl: [] for impl in IMPLEMENTATIONS}
        for repeat in range(args.repeats):
            for impl in IMPLEMENTATIONS if repeat % 2 == 0 else reversed(IMPLEMENTATIONS):
                times[impl].append(step_ms(cfg, impl, args.steps))
        foreach, fused = params_after(cfg, "foreach"), params_after(cfg, "fused")
        diff = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(foreach, fused))
        medians = {impl: statistics.median(ms) for impl, ms in times.items()}
        results[case] = {"parameters": sum(p.numel() for p in foreach), "step_ms": times,
                         "median_step_ms": medians, "fused_speedup": medians["foreach"] / medians["fused"],
                         "max_rel_param_diff_after_5_steps": diff}
        print(f"{case}: {results[case]['parameters'] / 1e6:.2f}M parameters, AdamW step foreach "
              f"{medians['foreach']:.2f} ms, fused {medians['fused']:.2f} ms ({results[case]['fused_speedup']:.1f}x); "
              f"parameters after 5 steps differ by {diff:.1e} relative at most", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "optimizer_step", "config": args.config, "steps": args.steps,
                               "repeats": args.repeats, "threads": args.threads, "machine": describe_machine(),
                               "cases": results}, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
