"""Pipeline bubble: the measured idle fraction of every pipeline schedule, beside theory; JSON to
benchmarks/results/pipeline_bubble.json.

For pp in {2, 4} (one gloo world of pp CPU processes each, spawned here) and micro-batch counts
m in {4, 8, 16}, every schedule of `parallel.pipeline.SCHEDULES` (gpipe, 1f1b, interleaved-1f1b,
zero-bubble, zbv, dualpipev) is built with `parallel.pipeline.build_pipeline` over a small
Llama-style `models.llm.model.Transformer` (8 layers by default: enough for pp x 2 stages) and
stepped through `Pipeline.run(..., backward=True)` as `launcher/trainer.py` does. A case that
torch or shardwright refuses (e.g. DualPipeV needs m >= 2 pp) is recorded with its error message.

What is measured. Each rank wraps its stages' `forward_one_chunk` ("F"), `backward_one_chunk`
(full "B", or input-only "I" under the zero-bubble schedules) and `backward_weight_one_chunk`
("W"), and the loss function ("L", last stage), recording wall-clock start/end (time.perf_counter,
one system-wide monotonic clock) and the thread's CPU time of each call. A step's window runs
from the first rank entering the schedule (after a barrier) to the last rank leaving
`schedule.step`. Per rank, idle = 1 - (sum of its compute intervals) / window. Cases run round
robin (step i of every case, then step i + 1), after warm-up steps that also absorb torch's shape
inference; a case reports the mean over ranks, median over the measured steps, plus the per-rank
and per-step values. Three idle numbers per case:

- measured: the definition above, from wall-clock timestamps. Includes everything that is not
  compute: pipeline bubbles, point-to-point latency, torch's Python scheduling overhead, and
  time a rank waits for a core or for a peer that waits for one. Its "(ready)" part is the
  time an op waited although its input was already computed and its rank was free (latency,
  overhead, a missing core); the rest is waiting on dependencies.
- replay: the same per-rank op sequence as it actually ran, replayed with each op's *CPU* time
  as its duration and zero communication latency (dependencies: F(s) after F(s-1); the loss
  after the last F; B/I(s) after B/I(s+1) or the loss; W(s) after I(s)). CPU time does not grow
  while a process is descheduled, so this is the bubble the schedule would have on dedicated
  cores with free communication, given our real F/I/W/B costs (stage imbalance included). Its
  makespan is `replay_step_s`, a load-independent step time.
- ideal: the same replay with unit costs F = I = W = 1, B = 2, L = 0: the schedule's intrinsic
  bubble as torch lays it out. For gpipe and 1f1b it reproduces (p-1)/(m+p-1), for
  interleaved-1f1b (p-1)/(2m+p-1), exactly.

Theory (closed forms, idle as a share of the step): GPipe and 1F1B (p-1)/(m+p-1) (Huang et al.
2019, GPipe; Narayanan et al. 2021, arXiv:2104.04473, sec. 2.2.1: bubble/ideal = (p-1)/m);
interleaved 1F1B with v stages per rank (p-1)/(v m+p-1) (Narayanan et al. 2021, sec. 2.2.2:
bubble/ideal = (p-1)/(v m), for m a multiple of p, which holds for the default grid). Zero-bubble
schedules (Qi et al. 2023, arXiv:2401.10241) have no closed form here: their bubble depends on
T_F, T_I and T_W (their Table 1: 1F1B (p-1)(T_F+T_B+T_W), ZB-H1 (p-1)(T_F+T_B-T_W), T_B being
the input-gradient part), and torch's ZBV docstring promises zero bubble only for
T_F = T_I = T_W. The "ideal" column is their value under that assumption.

What keeps zero-bubble above its ideal here (see `op_cpu_ms_per_stage`, `zero_bubble_vs_1f1b`):
torch runs the first stage's whole backward in W (its I is empty: the stage input is token ids),
which on CPU costs less than I + W elsewhere, so the rank holding stage 0 has less work and
waits; the last stage carries the norm, head and loss. The split is not free: I + W run two
autograd passes plus torch's Python walk of the graph (`split_backward_cpu_vs_full` compares
them with interleaved-1f1b's full backward over the same stages). The method's premise does hold:
W is about half of each backward (`w_share_of_backward`), so there is real work to fill bubbles.

Trustworthiness. The machine this was written on has 2 cores shared with other work; each
process runs one torch thread. pp=2 gives each rank a core, so measured and replay roughly agree when
the machine is otherwise quiet, their gap being communication and scheduling overhead. pp=4 puts
4 processes on 2 cores: wall-clock compute intervals stretch when all ranks are busy and shrink
in the bubbles, which hides part of the bubble, while a descheduled peer adds waits; for pp=4,
and whenever `stretch` (wall / CPU time of compute ops; 1 = a core to itself) is well above 1,
trust "replay" and "ideal" more than "measured". A stage's forward takes several milliseconds
(`op_cpu_ms`), against 128 KB activation messages over loopback TCP.

    .venv/bin/python benchmarks/pipeline_bubble.py [--pp 2 4] [--microbatches 4 8 16]
        [--schedules gpipe 1f1b ...] [--warmup 2] [--steps 3] [--dim 256] [--layers 8]
        [--seq-len 128] [--micro-batch-size 1] [--vocab 512] [--out FILE]

Runtime with the defaults on 2 busy cores: about 3-4 minutes (two worlds, 36 cases).
"""
import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launcher.metrics import describe_machine  # noqa: E402
from models.common.loss import cross_entropy_sum  # noqa: E402
from models.llm.model import LLMConfig, Transformer  # noqa: E402
from models.llm.parallelize import split_stage  # noqa: E402
from parallel.init import init_parameters  # noqa: E402
from parallel.pipeline import SCHEDULES, SINGLE_STAGE, PipelineError, build_pipeline, stages_per_rank  # noqa: E402

UNIT_COST = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0, "L": 0.0}
VIRTUAL = 2  # stages per rank for every multi-stage schedule (the V-shaped ones need exactly 2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--warmup", type=int, default=2, help="steps per case left out of the measurement")
    p.add_argument("--steps", type=int, default=3, help="measured steps per case")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8, help="must split evenly into pp x 2 stages")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--vocab", type=int, default=512, help="small, so the head does not unbalance the last stage")
    p.add_argument("--case-timeout", type=int, default=180, help="seconds before a hung case fails (gloo timeout)")
    p.add_argument("--out", default="benchmarks/results/pipeline_bubble.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first step runs torch's shape inference)")
    return args


# ---------------------------------------------------------------------------------------------
# Inside a rank


class Recorder:
    """Compute intervals of this rank's stages: (kind, stage, microbatch, t0, t1, cpu_seconds)."""

    def __init__(self, n_stages: int):
        self.n_stages = n_stages
        self.events: list[tuple] = []
        self.last_forward_mb = None  # the loss belongs to the last stage's latest forward

    def timed(self, kind_of, stage_index: int, fn):
        def wrapper(mb, *args, **kwargs):
            kind = kind_of(args, kwargs)
            c0, t0 = time.thread_time(), time.perf_counter()
            try:
                return fn(mb, *args, **kwargs)
            finally:
                self.events.append((kind, stage_index, mb, t0, time.perf_counter(), time.thread_time() - c0))
                if kind == "F" and stage_index == self.n_stages - 1:
                    self.last_forward_mb = mb
        return wrapper

    def instrument(self, stage) -> None:
        s = stage.stage_index
        stage.forward_one_chunk = self.timed(lambda a, k: "F", s, stage.forward_one_chunk)
        stage.backward_one_chunk = self.timed(
            lambda a, k: "B" if k.get("full_backward", a[1] if len(a) > 1 else True) else "I", s,
            stage.backward_one_chunk)
        stage.backward_weight_one_chunk = self.timed(lambda a, k: "W", s, stage.backward_weight_one_chunk)

    def timed_loss(self, loss_fn):
        def wrapper(logits, targets):
            c0, t0 = time.thread_time(), time.perf_counter()
            try:
                return loss_fn(logits, targets)
            finally:
                self.events.append(("L", self.n_stages - 1, self.last_forward_mb, t0, time.perf_counter(),
                                    time.thread_time() - c0))
        return wrapper


class Case:
    """One schedule at one micro-batch count, built over its own process group on this rank."""

    def __init__(self, args, pp: int, schedule: str, m: int):
        self.schedule, self.m = schedule, m
        self.steps: list[dict] = []
        self.error = None
        # A fresh group per case: a case that fails half-way cannot leave stray messages for others.
        self.group = dist.new_group(list(range(pp)), timeout=timedelta(seconds=args.case_timeout))
        try:
            self._build(args, pp)
        except Exception as e:  # a refused schedule raises the same on every rank
            self.fail(e)

    def _build(self, args, pp: int) -> None:
        per_rank = stages_per_rank(self.schedule, 1 if self.schedule in SINGLE_STAGE else VIRTUAL)
        self.n_stages = pp * per_rank
        cfg = LLMConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab)
        with torch.device("meta"):
            model = Transformer(cfg)
        self.recorder = Recorder(self.n_stages)
        tokens = self.m * args.micro_batch_size * args.seq_len

        self.loss_values: list[torch.Tensor] = []

        def loss_fn(logits, targets):  # mean token loss of the whole batch, as the trainer normalizes it
            loss = cross_entropy_sum(logits, targets) / tokens
            self.loss_values.append(loss.detach())
            return loss

        mesh = DeviceMesh.from_group(self.group, "cpu", mesh_dim_names=("pp",))
        self.pipeline = build_pipeline(model, split_stage, lambda part: part, cfg.n_layers, mesh, self.schedule,
                                       per_rank, "", self.m, self.recorder.timed_loss(loss_fn), torch.device("cpu"))
        for part in self.pipeline.parts:
            part.to_empty(device="cpu")
            init_parameters(part, seed=0)
        # Pipeline does not expose its PipelineStage objects; the schedule holds them.
        runner = self.pipeline.schedule
        self.stages = self.pipeline.stages
        for stage in self.stages:
            self.recorder.instrument(stage)
        self.step_ends: list[float] = []
        original_step = runner.step

        def timed_step(*a, **k):
            try:
                return original_step(*a, **k)
            finally:
                self.step_ends.append(time.perf_counter())
        runner.step = timed_step
        g = torch.Generator().manual_seed(0)
        batch = (self.m * args.micro_batch_size, args.seq_len)
        self.inputs = torch.randint(0, args.vocab, batch, generator=g)
        self.targets = torch.randint(0, args.vocab, batch, generator=g)

    def fail(self, e: Exception) -> None:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        self.error = {"error": f"{type(e).__name__}: {message}",
                      "traceback": None if isinstance(e, PipelineError) else traceback.format_exc()}

    def step(self, measured: bool) -> None:
        try:
            for part in self.pipeline.parts:
                part.zero_grad(set_to_none=True)
            self.recorder.events = []
            dist.barrier(group=self.group)
            cpu0, start = time.process_time(), time.perf_counter()
            self.loss_values = []
            self.pipeline.run((self.inputs,), {}, self.targets, backward=True)
            cpu = time.process_time() - cpu0  # every thread of the process, gloo's included
            # The last stage's micro-batch losses (a schedule's first step also calls loss_fn once to
            # infer shapes: the micro-batches' calls are the last m), summed over the pipeline.
            loss = torch.stack(self.loss_values[-self.m:]).sum() if self.loss_values else torch.zeros(())
            dist.all_reduce(loss, group=self.group)
            if measured:
                self.steps.append({"start": start, "end": self.step_ends[-1], "events": self.recorder.events,
                                   "process_cpu": cpu, "loss": float(loss)})
        except Exception as e:
            self.fail(e)

    def result(self) -> dict:
        if self.error:
            return {"ok": False, **self.error}
        return {"ok": True, "n_stages": self.n_stages, "stage_ids": [s.stage_index for s in self.stages],
                "steps": self.steps}


def worker(rank: int, pp: int, args, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=pp, timeout=timedelta(seconds=args.case_timeout + 60))
    cases = [Case(args, pp, schedule, m) for schedule in args.schedules for m in args.microbatches]
    # Round robin: step i of every case, then step i + 1 of every case. Load from other work on a
    # shared machine then falls on all schedules alike instead of on whichever ran at that moment.
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        for case in cases:
            if case.error is None:
                case.step(measured=i >= args.warmup)
            failed = [None] * pp  # every rank must agree to skip a case that failed on any rank
            dist.all_gather_object(failed, case.error)
            if case.error is None and any(failed):
                case.error = next(f for f in failed if f)
        if rank == 0:
            print(f"  pp={pp} {'warm-up' if i < args.warmup else 'measured'} round {i + 1}/{args.warmup + args.steps}: "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
    results = {}
    for case in cases:
        everyone = [None] * pp
        dist.all_gather_object(everyone, case.result())
        results[(case.schedule, case.m)] = everyone
        if case.error is None:
            dist.destroy_process_group(case.group)
    if rank == 0:
        with open(out_path, "wb") as f:
            torch.save(results, f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Analysis (rank 0's gathered records, in the parent process)


def dependency(kind: str, stage: int, mb: int, n_stages: int, has_loss: bool):
    """The op that must finish before (kind, stage, mb) can start, as a replay key."""
    if kind == "F":
        return ("F", stage - 1, mb) if stage > 0 else None
    if kind == "L":
        return ("F", n_stages - 1, mb)
    if kind in ("B", "I"):
        if stage < n_stages - 1:
            return ("B", stage + 1, mb)
        return ("L", n_stages - 1, mb) if has_loss else ("F", n_stages - 1, mb)
    if kind == "W":
        return ("B", stage, mb)
    raise ValueError(kind)


def replay(ops_per_rank: list[list[tuple]], n_stages: int, cost) -> dict:
    """List-schedule each rank's ops in their recorded order, each after its dependency, with
    durations cost(op) and free communication. Returns makespan and per-rank idle fractions."""
    has_loss = any(op[0] == "L" for ops in ops_per_rank for op in ops)
    finished: dict[tuple, float] = {}
    clock = [0.0] * len(ops_per_rank)
    busy = [0.0] * len(ops_per_rank)
    index = [0] * len(ops_per_rank)
    progress = True
    while progress:
        progress = False
        for r, ops in enumerate(ops_per_rank):
            while index[r] < len(ops):
                op = ops[index[r]]
                kind, stage, mb = op[:3]
                dep = dependency(kind, stage, mb, n_stages, has_loss)
                if dep is not None and dep not in finished:
                    break
                start = max(clock[r], finished[dep] if dep is not None else 0.0)
                clock[r] = start + cost(op)
                busy[r] += cost(op)
                finished[("B" if kind == "I" else kind, stage, mb)] = clock[r]
                index[r] += 1
                progress = True
    if any(index[r] < len(ops) for r, ops in enumerate(ops_per_rank)):
        raise RuntimeError("replay deadlocked: the recorded op order does not satisfy the dependencies")
    makespan = max(clock)
    return {"makespan": makespan, "idle_per_rank": [1 - b / makespan for b in busy]}


def ready_delays(steps: list[dict], n_stages: int, start: float) -> list[float]:
    """Per rank, the measured time its ops waited although their input was computed (on whatever
    rank) and the rank was free: communication latency, schedule overhead, waiting for a core."""
    has_loss = any(e[0] == "L" for s in steps for e in s["events"])
    finished = {("B" if e[0] == "I" else e[0], e[1], e[2]): e[4] for s in steps for e in s["events"]}
    delays = []
    for s in steps:
        free, delay = start, 0.0
        for kind, stage, mb, t0, t1, _ in s["events"]:
            dep = dependency(kind, stage, mb, n_stages, has_loss)
            ready = max(free, finished[dep] if dep is not None else start)
            delay += max(0.0, t0 - ready)
            free = t1
        delays.append(delay)
    return delays


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def theory(schedule: str, p: int, m: int):
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1), "(p-1)/(m+p-1)"
    if schedule == "interleaved-1f1b":
        return (p - 1) / (VIRTUAL * m + p - 1), f"(p-1)/(v*m+p-1), v={VIRTUAL}"
    return None, None


def analyze(pp: int, schedule: str, m: int, ranks: list[dict]) -> dict:
    t1f1b = (pp - 1) / (m + pp - 1)
    row = {"pp": pp, "schedule": schedule, "torch_class": SCHEDULES[schedule], "microbatches": m,
           "theory_1f1b": t1f1b}
    if not all(r["ok"] for r in ranks):
        bad = [r for r in ranks if not r["ok"]]
        row["error"] = bad[0]["error"]
        if bad[0].get("traceback"):
            row["traceback"] = bad[0]["traceback"]
        return row
    n_stages = ranks[0]["n_stages"]
    value, formula = theory(schedule, pp, m)
    row.update(stages_per_rank=n_stages // pp, n_stages=n_stages, stage_ids=[r["stage_ids"] for r in ranks],
               theory=value, theory_formula=formula)
    n_steps = len(ranks[0]["steps"])
    measured, latency, replayed, ideal, windows, replay_windows, stretch, overhead = [], [], [], [], [], [], [], []
    op_cpu: dict[str, list[float]] = {}
    stage_cpu: dict[str, list[float]] = {}  # e.g. "W0": backward-weight of stage 0
    for i in range(n_steps):
        steps = [r["steps"][i] for r in ranks]
        start, end = min(s["start"] for s in steps), max(s["end"] for s in steps)
        window = end - start
        windows.append(window)
        measured.append([1 - sum(e[4] - e[3] for e in s["events"]) / window for s in steps])
        latency.append([d / window for d in ready_delays(steps, n_stages, start)])
        wall_busy = sum(e[4] - e[3] for s in steps for e in s["events"])
        cpu_busy = sum(e[5] for s in steps for e in s["events"])
        stretch.append(wall_busy / cpu_busy)
        overhead.append(1 - cpu_busy / sum(s["process_cpu"] for s in steps))
        ops = [[e[:3] + (e[5],) for e in s["events"]] for s in steps]  # (kind, stage, mb, cpu_s)
        cpu_replay = replay(ops, n_stages, lambda op: op[3])
        replayed.append(cpu_replay["idle_per_rank"])
        replay_windows.append(cpu_replay["makespan"])
        ideal.append(replay(ops, n_stages, lambda op: UNIT_COST[op[0]])["idle_per_rank"])
        for s in steps:
            for e in s["events"]:
                op_cpu.setdefault(e[0], []).append(e[5])
                stage_cpu.setdefault(f"{e[0]}{e[1]}", []).append(e[5])

    def per_rank(rows):  # median over steps, rank by rank
        return [statistics.median(col) for col in zip(*rows)]

    def over_ranks(rows):  # median over steps of the mean over ranks
        return statistics.median(mean(r) for r in rows)

    row.update(
        idle_measured=over_ranks(measured), idle_measured_per_rank=per_rank(measured),
        idle_measured_each_step=[mean(r) for r in measured],
        idle_measured_ready=over_ranks(latency), idle_measured_ready_per_rank=per_rank(latency),
        idle_replay=over_ranks(replayed), idle_replay_per_rank=per_rank(replayed),
        idle_ideal=over_ranks(ideal), idle_ideal_per_rank=per_rank(ideal),
        step_s=statistics.median(windows), step_s_each=windows, replay_step_s=statistics.median(replay_windows),
        stretch=statistics.median(stretch), non_compute_cpu_share=statistics.median(overhead),
        op_cpu_ms={k: {"count_per_step": len(v) // n_steps, "mean": 1e3 * mean(v),
                       "total_per_step": 1e3 * sum(v) / n_steps} for k, v in sorted(op_cpu.items())},
        op_cpu_ms_per_stage={k: 1e3 * mean(v) for k, v in sorted(stage_cpu.items(), key=lambda kv: (kv[0][1:], kv[0]))},
        loss=ranks[0]["steps"][-1]["loss"])
    return row


def compare_zero_bubble(rows: list[dict], args) -> list[dict]:
    """zero-bubble against 1F1B per (pp, m), with what the backward split costs: W's share of the
    backward and I+W against the full backward B of interleaved-1f1b (same stages per rank)."""
    comparison = []
    for pp in args.pp:
        for m in args.microbatches:
            by = {r["schedule"]: r for r in rows if r["pp"] == pp and r["microbatches"] == m and "error" not in r}
            if "zero-bubble" not in by or "1f1b" not in by:
                continue
            zb, ref = by["zero-bubble"], by["1f1b"]
            ops = zb["op_cpu_ms"]
            entry = {"pp": pp, "microbatches": m}
            for name, key in (("measured", "idle_measured"), ("replay", "idle_replay"), ("ideal", "idle_ideal")):
                entry[f"zero_bubble_{name}"], entry[f"1f1b_{name}"] = zb[key], ref[key]
                entry[f"zero_bubble_below_1f1b_{name}"] = zb[key] < ref[key]
            entry.update({"zero_bubble_step_s": zb["step_s"], "1f1b_step_s": ref["step_s"],
                          "zero_bubble_replay_step_s": zb["replay_step_s"], "1f1b_replay_step_s": ref["replay_step_s"]})
            entry.update(w_share_of_backward=ops["W"]["total_per_step"] / (ops["I"]["total_per_step"]
                                                                         + ops["W"]["total_per_step"]))
            if "interleaved-1f1b" in by:
                entry["split_backward_cpu_vs_full"] = ((ops["I"]["total_per_step"] + ops["W"]["total_per_step"])
                                                       / by["interleaved-1f1b"]["op_cpu_ms"]["B"]["total_per_step"])
            comparison.append(entry)
    return comparison


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    rows = []
    for pp in args.pp:
        if args.layers % (pp * VIRTUAL):
            sys.exit(f"--layers {args.layers} must split evenly into pp x {VIRTUAL} = {pp * VIRTUAL} stages")
        print(f"pp={pp}: spawning {pp} processes", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.pt")
            mp.spawn(worker, args=(pp, args, free_port(), out), nprocs=pp, join=True)
            results = torch.load(out, weights_only=False)
        for (schedule, m), ranks in results.items():
            rows.append(analyze(pp, schedule, m, ranks))

    comparison = compare_zero_bubble(rows, args)
    losses = {(r["pp"], r["microbatches"], r["schedule"]): r["loss"] for r in rows if "error" not in r}
    losses_agree = all(abs(v - losses[k2]) <= 1e-5 * abs(v) for k, v in losses.items() for k2 in losses
                       if k2[1] == k[1])  # same data and init: every layout and schedule gives the same loss

    header = (f"{'pp':>2} {'m':>3} {'schedule':>16} {'measured':>9} {'(ready)':>7} {'replay':>7} {'ideal':>6} "
              f"{'theory':>7} {'1F1B th.':>8} {'step ms':>8} {'replay ms':>9} {'stretch':>7}")
    print("\nidle fraction (mean over ranks, median over steps)\n" + header + "\n" + "-" * len(header))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            print(f"{r['pp']:>2} {r['microbatches']:>3} {r['schedule']:>16}  error: {r['error'][:100]}")
            continue
        print(f"{r['pp']:>2} {r['microbatches']:>3} {r['schedule']:>16} {r['idle_measured']:>9.3f} "
              f"{r['idle_measured_ready']:>7.3f} {r['idle_replay']:>7.3f} {r['idle_ideal']:>6.3f} "
              f"{fmt(r['theory']):>7} {r['theory_1f1b']:>8.3f} "
              f"{1e3 * r['step_s']:>8.1f} {1e3 * r['replay_step_s']:>9.1f} {r['stretch']:>7.2f}")
    print("\nzero-bubble below 1F1B?")
    for c in comparison:
        split = c.get("split_backward_cpu_vs_full")
        print(f"  pp={c['pp']} m={c['microbatches']:<3} measured {c['zero_bubble_measured']:.3f} vs "
              f"{c['1f1b_measured']:.3f}: {'yes' if c['zero_bubble_below_1f1b_measured'] else 'NO '}   replay "
              f"{c['zero_bubble_replay']:.3f} vs {c['1f1b_replay']:.3f}: "
              f"{'yes' if c['zero_bubble_below_1f1b_replay'] else 'NO '}   W share of backward "
              f"{c['w_share_of_backward']:.2f}" + (f", I+W / full B {split:.2f}" if split else ""))
    print(f"losses agree across schedules and pp: {losses_agree}")

    result = {
        "benchmark": "pipeline_bubble",
        "torch": torch.__version__,
        "machine": {**describe_machine(), "threads_per_process": 1, "backend": "gloo (CPU)"},
        "model": {"family": "llm", "dim": args.dim, "n_layers": args.layers, "n_heads": args.heads,
                  "vocab_size": args.vocab, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
                  "dtype": "float32"},
        "method": {
            "warmup_steps": args.warmup, "measured_steps": args.steps, "stages_per_rank_multi": VIRTUAL,
            "order": "round robin: step i of every case, then step i+1, so load from other work hits all alike",
            "idle_measured": "per rank 1 - sum(wall time of its F/B/I/W/loss calls) / step window; window from "
                             "the first rank entering the schedule to the last rank leaving schedule.step; "
                             "mean over ranks, median over measured steps",
            "idle_measured_ready": "the part of idle_measured in which an op's input was already computed (on "
                                   "whatever rank) and its rank was free: communication latency, schedule "
                                   "overhead, waiting for a core; the rest is waiting on dependencies (bubble, "
                                   "imbalance, slow peers)",
            "idle_replay": "the recorded per-rank op order replayed with each op's thread CPU time and zero "
                           "communication latency (unaffected by descheduling when processes outnumber cores)",
            "idle_ideal": "the recorded op order replayed with unit costs F=I=W=1, B=2, loss=0",
            "replay_step_s": "makespan of that CPU-time replay: a load-independent step time (no communication)",
            "theory": "gpipe/1f1b (p-1)/(m+p-1) [Huang et al. 2019; Narayanan et al. 2021 arXiv:2104.04473 "
                      "sec 2.2.1]; interleaved (p-1)/(v*m+p-1) [ibid. sec 2.2.2]; zero-bubble schedules: no closed "
                      "form, depends on T_F, T_B, T_W [Qi et al. 2023 arXiv:2401.10241 Table 1]",
            "stretch": "wall time / CPU time summed over compute ops: ~1 means each rank had a core to itself",
            "non_compute_cpu_share": "share of the processes' CPU time during a step spent outside compute ops "
                                     "(schedule Python, gloo threads, barrier)",
            "op_cpu_ms_per_stage": "mean CPU ms per call, keyed kind+stage: F forward, B full backward, I input "
                                   "backward, W weight backward, L loss",
            "trust": "pp=2: one process per core, measured is meaningful up to noise from other users of the "
                     "machine (see stretch and step_s_each). pp=4 on 2 cores: compute intervals stretch when all "
                     "ranks are busy, hiding bubble, and waits grow when a peer is descheduled; trust replay and "
                     "ideal there more than measured.",
        },
        "runtime_s": time.perf_counter() - started,
        "losses_agree": losses_agree,
        "cases": rows,
        "zero_bubble_vs_1f1b": comparison,
        "zero_bubble_below_1f1b": {
            "measured": sum(c["zero_bubble_below_1f1b_measured"] for c in comparison),
            "replay": sum(c["zero_bubble_below_1f1b_replay"] for c in comparison),
            "ideal": sum(c["zero_bubble_below_1f1b_ideal"] for c in comparison),
            "of": len(comparison)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out} ({result['runtime_s']:.0f} s)")


if __name__ == "__main__":
    main()
