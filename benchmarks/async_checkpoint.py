"""Step time while a checkpoint is saved, synchronous against asynchronous (checkpoint.async_save), as JSON.

Each run is `launcher.trainer.train` itself, one process in a fresh Python process (on CPU: a 1-rank gloo
group, fp32, with `--threads` torch threads). The wall time of step k is the time between the step records
k-1 and k of the run (MetricsWriter.log), so it covers everything between them: the training step, and a save
called after step k-1 (its blocking part), and a publish. A save after step s therefore lands in step s+1; an
async save stays in flight until it is published after step p (the first step boundary where its write is
done), so steps s+1 .. p+1 are the steps "during a save". Other steps (after `--warmup`) are steps without one.

Modes, alternating in every repeat: `none` (no saves at all: checkpoint.enabled=false), `sync`, `async` (a save
every `--every` steps; the final save comes after the last step record and is not timed). An async save whose
write is still running when the next save is called is waited for there, so its steps run into the next save's
(or, before the final save, it is left out of the timing): `saves_in_flight_at_next_save` counts them, and
above zero `--every` is too short for a save on this machine. Per mode: the median wall of steps
without a save, the median and mean wall of steps during a save, their ratio to the `none` median, the time a
save adds to the run (sum of the walls of steps during saves minus as many `none` medians, per save), and the
wall of the save call itself (the blocking part). Because a shared VM's speed drifts by tens of percent over
tens of seconds, each save's steps are also compared with the steps just before it in the same run
(`during_save_vs_steps_before_it`: the median over saves of their mean over the preceding steps' median):
the issue's goal, steps during an async save within 5% of steps without one, is read from that. A run's first
async save also allocates the copy in shared memory that later saves reuse (a one-time ~0.25 s in its step), so
first saves and later saves are also given apart; a later save has steps before it only where the previous save
was published before it was called: with a write that takes the whole interval (`--every` short for this
machine), only first saves are compared. Per async save, the CPU seconds DCP's writer process used between
the save call and the publication (Linux: /proc) tell what the save took from training on a busy CPU.

    .venv/bin/python benchmarks/async_checkpoint.py [--dim 256] [--layers 10] [--steps 36] [--every 6]
        [--warmup 3] [--repeats 2] [--threads N] [--set section.key=value ...] [--out FILE]

On a CUDA machine the runs train on the GPU (as `train` does wherever CUDA is), so the same script measures
an async save where its copy is a device-to-host copy (benchmarks/gpu_suite.py runs it so).

On a 2-core machine the writer process and the hashing thread compete with training for the same cores.
"""
import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project need not be installed (gpu_suite.py)

import torch  # noqa: E402

import launcher.checkpoint  # noqa: E402
import launcher.metrics  # noqa: E402
from launcher.config import load_config  # noqa: E402
from launcher.metrics import describe_machine  # noqa: E402
from launcher.trainer import train  # noqa: E402

MODES = ("none", "sync", "async")
GOAL = 1.05


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/llm/tiny.yaml")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--steps", type=int, default=36)
    p.add_argument("--every", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=2, help="runs of each mode (alternating, each a fresh process)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="further config overrides (after --dim/--layers, so they can replace them)")
    p.add_argument("--out", default="benchmarks/results/async_checkpoint.json")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    args = p.parse_args()
    if not (1 <= args.every and 0 <= args.warmup < args.steps):
        p.error("--every must be >= 1 and --warmup at least 0 and less than --steps")
    return args


def run_mode(args) -> dict:
    """One run: {"walls": {step: seconds}, "saves": [(save step, step after which it was published)], ...}."""
    torch.set_num_threads(args.threads)
    stamps, saves, published, in_flight_at_next_save = {}, [], [], []
    writer_cpu_at_call, writer_cpu = {}, {}
    real_log, real_save, real_publish, real_wait = (
        launcher.metrics.MetricsWriter.log, launcher.checkpoint.Checkpointer.save,
        launcher.checkpoint.Checkpointer._publish, launcher.checkpoint.Checkpointer.wait)

    def log(writer, record, show, **options):
        real_log(writer, record, show, **options)
        if "loss" in record:
            stamps[record["step"]] = time.perf_counter()

    def save(checkpointer, step, *rest):
        writer_cpu_at_call[step] = writer_cpu_s()
        started = time.perf_counter()
        try:
            return real_save(checkpointer, step, *rest)
        finally:
            saves.append((step, time.perf_counter() - started))

    def publish(checkpointer, step, *rest):
        published.append((step, max(stamps)))
        if writer_cpu_at_call.get(step) is not None:
            writer_cpu[step] = writer_cpu_s() - writer_cpu_at_call[step]
        return real_publish(checkpointer, step, *rest)

    def wait(checkpointer):
        # poll() waits only for a finished write: a wait on an unfinished in-loop save is the next save's.
        pending = checkpointer._pending
        if pending is not None and pending[0] < args.steps and not pending[3].done():
            in_flight_at_next_save.append((pending[0], max(stamps)))
        return real_wait(checkpointer)

    launcher.metrics.MetricsWriter.log = log
    launcher.checkpoint.Checkpointer.save = save
    launcher.checkpoint.Checkpointer._publish = publish
    launcher.checkpoint.Checkpointer.wait = wait
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(args.config, [
            f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"train.steps={args.steps}",
            f"run.dir={run_dir}", "run.tensorboard=false", "train.eval_every=0", "train.eval_batches=1",
            "train.sample_prompt=", "run.log_every=1000",
            f"checkpoint.enabled={str(args.mode != 'none').lower()}",  # none: not even the final save
            f"checkpoint.every={0 if args.mode == 'none' else args.every}",
            f"checkpoint.async_save={str(args.mode == 'async').lower()}", "checkpoint.keep_last=1",
            *args.overrides])
        started = time.perf_counter()
        train(cfg)
        total = time.perf_counter() - started
        size = sum(f.stat().st_size for f in (Path(run_dir) / "checkpoints").rglob("*") if f.is_file())
    walls = {k: stamps[k] - stamps[k - 1] for k in stamps if k - 1 in stamps}
    # Saves published before the last step (its record is the last timed one).
    in_loop = dict(saves)
    return {"walls": walls, "saves": [(s, p) for s, p in published if s in in_loop and p < args.steps],
            "save_call_s": [in_loop[s] for s, p in published if s in in_loop and p < args.steps],
            "writer_cpu_s": [writer_cpu.get(s) for s, p in published if s in in_loop and p < args.steps],
            "in_flight_at_next_save": in_flight_at_next_save, "run_s": total, "checkpoint_bytes": size}


def writer_cpu_s() -> float | None:
    """CPU seconds (user + system) used so far by this process's multiprocessing children (DCP's writer process of
    an async save), or None where /proc cannot tell (not Linux) or there is none."""
    children = multiprocessing.active_children()
    if not children or not Path("/proc/self/stat").exists():
        return None
    total = 0.0
    for child in children:
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended since active_children() listed it
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def summarize(args, runs: dict[str, list[dict]]) -> dict:
    baseline = statistics.median(w for run in runs["none"] for k, w in run["walls"].items() if k > args.warmup)
    out = {"none": {"median_step_s": baseline}}
    for mode in ("sync", "async"):
        during, without, added, in_flight, local, first, later = [], [], [], [], [], [], []
        for run in runs[mode]:
            touched, free_since = set(), args.warmup + 1
            for i, (saved, published_after) in enumerate(run["saves"]):
                steps = range(saved + 1, published_after + 2)
                touched.update(steps)
                in_flight.append(len(steps))
                added.append(sum(run["walls"][k] for k in steps) - len(steps) * baseline)
                # The steps just before this save (after the previous one's), as the same machine state's baseline.
                before = [run["walls"][k] for k in range(free_since, saved + 1)]
                if before:
                    local.append(statistics.mean(run["walls"][k] for k in steps) / statistics.median(before))
                    (later if i else first).append(local[-1])
                free_since = published_after + 2
            during += [run["walls"][k] for k in sorted(touched)]
            without += [w for k, w in run["walls"].items() if k > args.warmup and k not in touched]
        save_calls = [c for run in runs[mode] for c in run["save_call_s"]]
        out[mode] = {"median_step_s_without_save": statistics.median(without),
                     # Steps between saves against a run without any: what saving leaves behind (docs/performance.md).
                     "without_save_vs_none_median": statistics.median(without) / baseline,
                     "median_step_s_during_save": statistics.median(during),
                     "mean_step_s_during_save": statistics.mean(during),
                     "during_save_vs_none_median": statistics.median(during) / baseline,
                     "during_save_vs_steps_before_it": statistics.median(local),
                     "during_save_vs_steps_before_it_each": local,
                     "first_save_vs_steps_before_it": first,  # async: with the one-time copy allocation
                     "later_save_vs_steps_before_it": later,
                     "steps_per_save": statistics.mean(in_flight),
                     "saves_in_flight_at_next_save": sum(len(run["in_flight_at_next_save"]) for run in runs[mode]),
                     "save_call_s": statistics.median(save_calls),
                     "added_s_per_save": statistics.mean(added)}
        cpu = [c for run in runs[mode] for c in run["writer_cpu_s"] if c is not None]
        if cpu:
            out[mode]["writer_process_cpu_s_per_save"] = statistics.median(cpu)
    out["async"]["within_goal"] = out["async"]["during_save_vs_steps_before_it"] <= GOAL
    return out


def main() -> int:
    args = parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return 0
    torch.set_num_threads(args.threads)  # as the runs have it, for describe_machine
    runs = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES if repeat % 2 == 0 else reversed(MODES):  # ABC, CBA, ...: drift hits all alike
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            run = json.loads(out.splitlines()[-1])
            runs[mode].append({**run, "walls": {int(k): w for k, w in run["walls"].items()}})  # JSON keys: str
            print(f"{mode}: {runs[mode][-1]['run_s']:.1f} s", file=sys.stderr)
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("mode", "out")},
              "machine": describe_machine(), "goal_during_save_vs_none": GOAL,
              "checkpoint_mb": runs["sync"][0]["checkpoint_bytes"] / 1e6, **summarize(args, runs),
              "runs": runs}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
