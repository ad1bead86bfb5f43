"""Long-context training under context parallelism: memory per rank and step time vs sequence
length for cp in {1, 2, 4}, and the longest sequence that trains within a per-rank memory budget.

Every measurement is a real training run through `launcher.trainer.train` (configs/llm/tiny.yaml
with the overrides below: one sequence per step, fp32, ring attention in the zigzag layout), in a
fresh gloo world of cp processes on this machine (tests/distributed/harness.run_world, one
thread per rank). A fresh world per (cp, seq_len), because a process's peak RSS never goes down.

Memory, per rank, from the kernel's resident-set counters (there is no allocator statistic for
CPU tensors in torch):

- peak RSS: the process's high-water mark over the whole run (VmHWM = ru_maxrss, what the
  trainer logs as mem_peak_gib). This is what the budget limits. It includes torch's own
  footprint (~0.3-0.5 GiB), gloo, the tokenizer, the data and the model.
- activation estimate: the high-water mark of the training loop (steps + final eval) minus the
  RSS at its start. The check wraps the trainer's `PeakFlops` (the last call before the
  loop) to record VmRSS there and reset the high-water mark (`/proc/self/clear_refs` 5). It
  also holds the gradients and AdamW moments allocated in the first step (3 x the rank's
  parameter bytes: settings.grads_adam_gib_per_rank), 10 MiB at cp=1 for this model.

The JSON reports the max over the ranks of a world. Step time: the median of the steps after
the first (the first allocates optimizer state), from <run.dir>/metrics.jsonl.

The budget search, per cp: start from the sweep's lengths, extrapolate the peak linearly to the
budget, run there, and narrow the bracket (interpolation, bisection when it stalls) to
`--granularity` tokens. The goal (issue 5): activation memory per rank falls ~1/cp, and cp=4
reaches >= 3.5x the length of cp=1 within the same budget.

    .venv/bin/python benchmarks/long_context.py [--budget-gib 1.0] [--lengths 2048,4096,8192]
        [--cps 1,2,4] [--granularity 256] [--steps 2] [--cp-mode ring] [--mmap-threshold BYTES]
        [--no-search] [--set section.key=value ...] [--out benchmarks/results/long_context.json]

Default run: about 11 minutes on 2 shared cores (cp=4 runs 4 processes on them). The model
(--set overrides the defaults in MODEL) is shrunk so that per-token activations are large and
attention FLOPs small: attention costs O(T^2) compute for O(T) memory, so a run at the cp=4
budget length does ~16x the attention work of cp=1's. Data: the embedded pydoc corpus with a
40% validation split (the final eval needs a seq_len + 1 token sample too), cached under
--cache-dir; that caps seq_len at 45k tokens.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 2**30
GOAL_RATIO = 3.5
# The benchmark model: tiny.yaml's family and vocabulary, narrow and shallow with a wide FFN, so
# activations per token are large next to the O(T) attention FLOPs per token.
MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=64",
         "model.ffn_dim_multiplier=4.0"]


# ---------------------------------------------------------------------------------------------
# The check: runs on every rank of a world (tests/distributed/worker.py calls it).

def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM (and ru_maxrss) := current RSS
        return True
    except OSError:
        return False


def train_and_measure(config: str, overrides: list[str], threads: int) -> dict:
    """One training run in this world; this rank's memory marks (bytes) and, on rank 0, step times."""
    import torch
    import torch.distributed as dist

    import launcher.trainer as trainer
    from launcher.config import load_config

    torch.set_num_threads(threads)
    marks = {}
    peak_flops = trainer.PeakFlops

    def mark_loop_start(*args, **kwargs):  # the trainer's last call before its loop
        result = peak_flops(*args, **kwargs)
        marks["setup_peak"] = _status_kib("VmHWM") * 1024
        marks["loop_start_rss"] = _status_kib("VmRSS") * 1024
        marks["hwm_reset"] = _reset_peak_rss()
        return result

    cfg = load_config(config, overrides)
    trainer.PeakFlops = mark_loop_start
    try:
        summary = trainer.train(cfg)
    finally:
        trainer.PeakFlops = peak_flops
    loop_peak = _status_kib("VmHWM") * 1024
    result = {"rank": dist.get_rank(), "setup_peak": marks["setup_peak"], "loop_start_rss": marks["loop_start_rss"],
              "loop_peak": loop_peak, "peak": max(loop_peak, marks["setup_peak"]), "hwm_reset": marks["hwm_reset"],
              "losses": summary["losses"]}
    if dist.get_rank() == 0:
        records = [json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]
        tokens = cfg.train.global_batch_size * cfg.train.seq_len
        result["step_times"] = [tokens / r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return result


# ---------------------------------------------------------------------------------------------
# The driver.

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/llm/tiny.yaml")
    p.add_argument("--budget-gib", type=float, default=1.0, help="peak RSS allowed per process")
    p.add_argument("--cps", default="1,2,4", help="cp sizes, comma-separated")
    p.add_argument("--lengths", default="2048,4096,8192", help="sweep seq_lens, run for every cp")
    p.add_argument("--granularity", type=int, default=256,
                   help="the budget search resolves seq_len to this many tokens (a multiple of 2 x max cp)")
    p.add_argument("--max-seq-len", type=int, default=0, help="search cap (0: what the data allows)")
    p.add_argument("--no-search", action="store_true", help="only the sweep")
    p.add_argument("--steps", type=int, default=2, help="training steps per run (>= 2: the first is left out)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--cp-mode", default="ring", choices=("ring", "ulysses"))
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="MALLOC_MMAP_THRESHOLD_ for the ranks, in bytes (0: glibc's default, a dynamic threshold)")
    p.add_argument("--source", default="pydoc", help="data.source: pydoc | stdlib | a .txt file or directory")
    p.add_argument("--valid-fraction", type=float, default=0.4)
    p.add_argument("--cache-dir", default="~/.cache/shardwright/long-context",
                   help="data cache (its own: the validation split differs from the default cache's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config overrides (after the benchmark's own)")
    p.add_argument("--out", default="benchmarks/results/long_context.json")
    p.add_argument("--keep", action="store_true", help="keep the run directories and rank logs")
    args = p.parse_args()
    args.cps = [int(c) for c in args.cps.split(",")]
    args.lengths = [int(n) for n in args.lengths.split(",") if n]
    multiple = 2 * max(args.cps)
    if args.granularity % multiple:
        p.error(f"--granularity must be a multiple of 2 x max cp = {multiple}")
    if any(n % multiple for n in args.lengths):
        p.error(f"every --lengths value must be a multiple of 2 x max cp = {multiple}")
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is left out of the timing)")
    return args


class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.cache = Path(args.cache_dir).expanduser()
        self.runs: list[dict] = []
        self.counter = 0
        self.started = time.monotonic()

    def overrides(self, cp: int | str, seq_len: int | str, run_dir: Path) -> list[str]:
        a = self.args
        return [*MODEL, f"parallel.cp={cp}", "parallel.dp_shard=1", "parallel.dp_replicate=1",
                f"parallel.cp_mode={a.cp_mode}", "parallel.cp_layout=zigzag", "train.global_batch_size=1",
                "train.micro_batch_size=1", f"train.seq_len={seq_len}", f"train.steps={a.steps}",
                "train.warmup_steps=0", "train.eval_every=0", "train.eval_batches=1", "train.sample_prompt=",
                "train.activation_checkpoint=none", "train.mixed_precision=fp32", "checkpoint.enabled=false",
                "run.tensorboard=false", f"run.log_every={a.steps}", f"run.dir={run_dir}",
                f"data.source={a.source}", f"data.valid_fraction={a.valid_fraction}", f"data.cache_dir={self.cache}",
                *a.overrides]

    def measure(self, cp: int, seq_len: int, phase: str) -> dict:
        """One training run of seq_len tokens in a fresh world of cp ranks."""
        from tests.distributed.harness import run_world

        for run in self.runs:
            if run["cp"] == cp and run["seq_len"] == seq_len:
                return run
        self.counter += 1
        world_dir = self.work / f"{self.counter:02d}-cp{cp}-T{seq_len}"
        check = ("benchmarks.long_context:train_and_measure",
                 {"config": self.args.config, "overrides": self.overrides(cp, seq_len, world_dir / "run"),
                  "threads": self.args.threads})
        started = time.monotonic()
        result = run_world(cp, [check], world_dir, timeout_s=1800, collective_timeout_s=900)[0]
        wall = time.monotonic() - started
        if result.errors:
            rank, tb = next(iter(sorted(result.errors.items())))
            raise SystemExit(f"cp={cp} seq_len={seq_len} failed on rank {rank} (logs in {world_dir}):\n{tb}")
        ranks = [result.values[r] for r in range(cp)]
        budget = self.args.budget_gib * GIB
        peak = max(r["peak"] for r in ranks)
        activation = max(r["loop_peak"] - r["loop_start_rss"] for r in ranks)
        steady = ranks[0]["step_times"][1:]
        run = {"cp": cp, "seq_len": seq_len, "tokens_per_rank": seq_len // cp, "phase": phase,
               "peak_rss_gib": peak / GIB, "peak_rss_gib_per_rank": [r["peak"] / GIB for r in ranks],
               "setup_peak_rss_gib": max(r["setup_peak"] for r in ranks) / GIB,
               "loop_start_rss_gib": max(r["loop_start_rss"] for r in ranks) / GIB,
               "activation_gib": activation / GIB, "within_budget": peak <= budget,
               "step_time_s": statistics.median(steady), "step_times_s": ranks[0]["step_times"],
               "tokens_per_s": seq_len / statistics.median(steady), "losses": ranks[0]["losses"],
               "peak_reset_ok": all(r["hwm_reset"] for r in ranks), "world_wall_s": wall}
        self.runs.append(run)
        print(f"  cp={cp} T={seq_len:>6} ({phase:>6}): peak RSS/rank {run['peak_rss_gib']:.3f} GiB "
              f"({'fits' if run['within_budget'] else 'over'}), activations {run['activation_gib']:.3f} GiB, "
              f"step {run['step_time_s']:.2f} s, world {wall:.0f} s, total {time.monotonic() - self.started:.0f} s",
              flush=True)
        return run

    def search(self, cp: int, cap: int) -> dict:
        """The longest multiple of the granularity whose run stays within the budget, and its bracket."""
        g, budget = self.args.granularity, self.args.budget_gib

        def known():
            done = sorted((r["seq_len"], r["peak_rss_gib"]) for r in self.runs if r["cp"] == cp)
            fits = [(n, m) for n, m in done if m <= budget and n % g == 0]
            over = [(n, m) for n, m in done if m > budget]
            return (fits[-1] if fits else None), (over[0] if over else None), done

        def rounded(n: float) -> int:
            return int(n // g) * g

        same_side, last_side = 0, None
        for _ in range(16):
            lo, hi, done = known()
            if lo is None:  # nothing fits yet: halve below the smallest run
                n = rounded(done[0][0] / 2)
                if n < g:
                    return {"seq_len": 0, "note": f"even {done[0][0]} tokens exceed the budget"}
            elif hi is None:  # nothing over the budget yet: extrapolate upwards
                if lo[0] >= cap:
                    return {"seq_len": lo[0], "capped": True, "note": f"reached the data cap of {cap} tokens"}
                # The steeper of the last two points' slope and lo's activation per token (allocator
                # effects make short runs flatter than long ones), then a touch past the line.
                points = [(n, m) for n, m in done if m <= budget][-2:]
                slope = (points[1][1] - points[0][1]) / (points[1][0] - points[0][0]) if len(points) == 2 else 0
                activation = next(r["activation_gib"] for r in self.runs if r["cp"] == cp and r["seq_len"] == lo[0])
                slope = max(slope, activation / lo[0])
                guess = lo[0] + (budget - lo[1]) / slope if slope > 0 else 2 * lo[0]
                n = min(cap, max(rounded(guess * 1.02), lo[0] + g))
            else:
                if hi[0] - lo[0] <= g:
                    return {"seq_len": lo[0], "peak_rss_gib": lo[1], "next_over": {"seq_len": hi[0], "peak_rss_gib": hi[1]}}
                if same_side >= 3:  # interpolation keeps landing on one side: bisect
                    n = rounded((lo[0] + hi[0]) / 2)
                else:
                    n = rounded(lo[0] + (budget - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1]))
                n = min(max(n, lo[0] + g), hi[0] - g)
            run = self.measure(cp, n, "search")
            side = run["within_budget"]
            same_side = same_side + 1 if side == last_side else 1
            last_side = side
        lo, _, _ = known()
        return {"seq_len": lo[0] if lo else 0, "note": "search stopped after 16 runs"}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return slope, my - slope * mx


def main() -> int:
    args = parse_args()
    import torch

    from data.embedded import prepare_embedded
    from launcher.config import load_config
    from launcher.metrics import describe_machine

    started, load_start = time.monotonic(), os.getloadavg()[0]
    if args.mmap_threshold:  # inherited by the ranks (run_world copies this environment)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    work = Path(tempfile.mkdtemp(prefix="long-context-"))
    bench = Bench(args, work)
    probe = load_config(args.config, bench.overrides(1, args.granularity, work / "probe"))
    data = prepare_embedded(probe.data.source, probe.data.vocab_size, Path(probe.data.cache_dir).expanduser(),
                            probe.data.valid_fraction, log=lambda m: print(f"[data] {m}"))
    data_cap = min(data.num_train_tokens, data.num_valid_tokens) - 1
    cap = (min(data_cap, args.max_seq_len) if args.max_seq_len else data_cap) // args.granularity * args.granularity
    model_cfg = probe.model_config()
    from models import get_model_spec
    with torch.device("meta"):
        n_params = sum(p.numel() for p in get_model_spec(probe.model.family).model_cls(model_cfg).parameters())
    print(f"long_context: {probe.model.family} dim {model_cfg.dim}, {model_cfg.n_layers} layers, "
          f"{model_cfg.n_heads}/{model_cfg.kv_heads} heads, ffn {model_cfg.ffn_hidden_dim}, vocab {model_cfg.vocab_size} "
          f"({n_params / 1e6:.2f}M params); budget {args.budget_gib} GiB/rank; data cap {cap} tokens; work dir {work}")

    try:
        for cp in args.cps:
            for n in args.lengths:
                bench.measure(cp, n, "sweep")
        longest = {}
        if not args.no_search:
            for cp in args.cps:
                longest[cp] = bench.search(cp, cap)
                print(f"  cp={cp}: longest within {args.budget_gib} GiB: {longest[cp]['seq_len']} tokens", flush=True)
    finally:
        if args.keep:
            print(f"run directories and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    runs = sorted(bench.runs, key=lambda r: (r["cp"], r["seq_len"]))
    # Activation bytes per token of the whole sequence, fitted per cp over every run (sweep + search).
    per_token = {}
    for cp in args.cps:
        pts = [(r["seq_len"], r["activation_gib"] * GIB) for r in runs if r["cp"] == cp]
        if len(pts) >= 2:
            slope, intercept = fit_line(pts)
            per_token[cp] = {"bytes_per_token": slope, "intercept_mib": intercept / 2**20}
    base = args.cps[0]
    for cp, fit in per_token.items():
        if base in per_token:
            fit["vs_cp1"] = fit["bytes_per_token"] / per_token[base]["bytes_per_token"]
    same_length = []
    for n in args.lengths:
        row = {r["cp"]: r for r in runs if r["seq_len"] == n}
        if base in row:
            same_length.append({"seq_len": n, **{f"activation_ratio_cp{cp}": row[cp]["activation_gib"] / row[base]["activation_gib"]
                                                  for cp in args.cps if cp in row}})
    ratios = {}
    if longest and base in longest and longest[base]["seq_len"]:
        for cp, found in longest.items():
            found["ratio_vs_cp1"] = found["seq_len"] / longest[base]["seq_len"]
            ratios[cp] = found["ratio_vs_cp1"]
    top = max(args.cps)
    bytes_per_param = 4  # fp32
    result = {
        "benchmark": "long_context",
        "what": "peak RSS per rank and step time vs seq_len under context parallelism; longest seq_len within a "
                "per-rank RSS budget",
        "goal": {"activation_per_rank": "~1/cp of cp=1's", "longest_ratio_cp4_vs_cp1": GOAL_RATIO},
        "meets_goal": (ratios.get(top, 0) >= GOAL_RATIO) if top == 4 and ratios else None,
        "budget_gib_per_rank": args.budget_gib,
        "granularity": args.granularity,
        "data_cap_tokens": cap,
        "settings": {"config": args.config, "overrides": bench.overrides("<cp>", "<seq_len>", Path("<run_dir>")),
                     "model": {"dim": model_cfg.dim, "n_layers": model_cfg.n_layers, "n_heads": model_cfg.n_heads,
                               "n_kv_heads": model_cfg.kv_heads, "ffn_hidden_dim": model_cfg.ffn_hidden_dim,
                               "vocab_size": model_cfg.vocab_size, "n_params": n_params},
                     "grads_adam_gib_per_rank": {cp: 3 * n_params * bytes_per_param / cp / GIB for cp in args.cps},
                     "steps": args.steps, "threads_per_rank": args.threads, "cp_mode": args.cp_mode,
                     "cp_layout": "zigzag", "source": args.source, "valid_fraction": args.valid_fraction,
                     "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")
                     or "glibc default (dynamic, up to 32 MiB)"},
        "memory_method": "peak RSS = VmHWM (= ru_maxrss) over the whole run; activation = VmHWM of the training loop "
                         "(reset via /proc/self/clear_refs at its start) minus VmRSS at its start; max over ranks",
        "machine": {**describe_machine(), "load_average_1min_start": load_start,
                    "note": "shared machine: step times are noisy; cp=4 runs 4 single-thread ranks on the cores"},
        "runtime_s": time.monotonic() - started,
        "longest_within_budget": {str(cp): v for cp, v in longest.items()},
        "activation_fit": {str(cp): v for cp, v in per_token.items()},
        "activation_ratio_same_length": same_length,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print("| cp | seq_len | tokens/rank | peak RSS/rank (GiB) | activations/rank (GiB) | vs cp=1 | step (s) | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    act_1 = {r["seq_len"]: r["activation_gib"] for r in runs if r["cp"] == base}
    for r in runs:
        if r["phase"] != "sweep":
            continue
        vs = f"{r['activation_gib'] / act_1[r['seq_len']]:.2f}" if r["seq_len"] in act_1 else "-"
        print(f"| {r['cp']} | {r['seq_len']} | {r['tokens_per_rank']} | {r['peak_rss_gib']:.3f} | "
              f"{r['activation_gib']:.3f} | {vs} | {r['step_time_s']:.2f} | {r['tokens_per_s']:.0f} |")
    if longest:
        print()
        print(f"| cp | longest seq_len within {args.budget_gib} GiB/rank | peak RSS/rank (GiB) | next step over | vs cp=1 |")
        print("|---|---|---|---|---|")
        for cp, found in longest.items():
            peak = next((r["peak_rss_gib"] for r in runs if r["cp"] == cp and r["seq_len"] == found["seq_len"]), None)
            over = found.get("next_over", {})
            print(f"| {cp} | {found['seq_len']}{' (data cap)' if found.get('capped') else ''} | "
                  f"{peak:.3f} | {over.get('seq_len', '-')} ({over.get('peak_rss_gib', 0):.3f}) | "
                  f"{found.get('ratio_vs_cp1', 0):.2f}x |")
    print()
    for cp, fit in per_token.items():
        print(f"cp={cp}: activations {fit['bytes_per_token'] / 1024:.1f} KiB per sequence token "
              f"({fit.get('vs_cp1', 1):.3f} x cp=1's), intercept {fit['intercept_mib']:.0f} MiB")
    if result["meets_goal"] is not None:
        print(f"cp={top} reaches {ratios[top]:.2f}x cp=1's length (goal >= {GOAL_RATIO}): "
              f"{'met' if result['meets_goal'] else 'NOT met'}")
    print(f"-> {out} ({result['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
