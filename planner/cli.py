"""`shardwright plan CONFIG --nodes N --gpus-per-node G [--gpu h100] ...`: arguments and the printed report."""
import argparse
from pathlib import Path

from launcher.config import load_config
from launcher.errors import UserError
from planner.devices import devices
from planner.search import USABLE_MEMORY, Candidate, Plan, evaluate, one_layer_bytes, plan
from planner.step_time import device

GIB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config whose model, batch and sequence length to plan for")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (tp stays within a node)")
    parser.add_argument("--gpu", default="h100", help=f"device profile: {', '.join(devices())} (planner/devices.yaml)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GiB", help="memory per GPU (default: "
                        "the profile's)")
    parser.add_argument("--matmul-efficiency", type=float, default=None, metavar="FRACTION",
                        help="fraction of peak FLOP/s the kernels reach (default: the profile's; docs/plan.md)")
    parser.add_argument("--seq-len", type=int, default=None, help="train.seq_len to plan for (default: the config's)")
    parser.add_argument("--global-batch-size", type=int, default=None,
                        help="train.global_batch_size in sequences (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--top", type=int, default=5, help="how many of the best layouts to print")
    parser.add_argument("--write", metavar="PATH", help="write the best layout as a config `train` and `submit` take")


def plan_command(args) -> int:
    for name in ("nodes", "gpus_per_node", "top"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: give a number >= 1")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise UserError(f"--gpu-memory {args.gpu_memory}: give the GPU's memory in GiB, > 0")
    if args.matmul_efficiency is not None and not 0 < args.matmul_efficiency <= 1:
        raise UserError(f"--matmul-efficiency {args.matmul_efficiency}: give a fraction of peak in (0, 1]")
    if args.write is not None and (Path(args.write).is_dir() or not Path(args.write).parent.is_dir()):
        raise UserError(f"--write {args.write}: give the path of a file in an existing directory")
    overrides = list(args.overrides)
    if args.seq_len is not None:
        overrides.append(f"train.seq_len={args.seq_len}")
    if args.global_batch_size is not None:
        overrides.append(f"train.global_batch_size={args.global_batch_size}")
    cfg = load_config(args.config, overrides)
    if cfg.parallel.engine != "torch":
        raise UserError(f"plan searches the torch engine's layouts (FSDP2, tp, pp, cp, ep); {args.config} sets "
                        f"parallel.engine={cfg.parallel.engine}, whose memory it does not model: plan with "
                        f"--set parallel.engine=torch")
    dev = device(args.gpu, args.gpus_per_node, args.gpu_memory, args.matmul_efficiency)
    world = args.nodes * args.gpus_per_node
    usable = USABLE_MEMORY * dev.memory_bytes
    layer = one_layer_bytes(cfg, dev)
    if layer > usable:
        raise UserError(f"{size(dev.memory_bytes)} per GPU is smaller than one layer of this model "
                        f"({size(layer)}: its parameters and one sequence's activations at tp="
                        f"{dev.gpus_per_node}); use GPUs with more memory or a shorter train.seq_len")
    result = plan(cfg, world, dev)
    print(f"plan: {cfg.model.family}, {cfg.train.global_batch_size} x {cfg.train.seq_len} tokens per step, on "
          f"{args.nodes} x {args.gpus_per_node} {dev.name} ({size(usable)} of {size(dev.memory_bytes)} "
          f"usable, {dev.peak_flops / 1e12:.0f} TFLOP/s bf16 peak x {dev.matmul_efficiency} efficiency)")
    print(f"{result.tried} layouts tried, {result.valid} valid, {len(result.ranked)} fit")
    for rank, c in enumerate(result.ranked[:args.top], 1):
        print(f"{rank}. {describe(result, c)}")
        print(f"   {terms(c)}")
    print_own_layout(cfg, result)
    print_families(result)
    if not result.ranked:
        closest = min(result.best_per_family.values(), key=lambda c: c.memory.total)
        raise UserError(f"no layout fits in {size(usable)} per GPU; the closest, {closest.layout.describe()}, "
                        f"needs {size(closest.memory.total)}, most of it {closest.memory.largest()} "
                        f"({size(closest.memory.terms[closest.memory.largest()])}); add GPUs or memory")
    if args.write:
        best = result.ranked[0].cfg
        best.dump(Path(args.write))
        print(f"wrote {args.write}: {result.ranked[0].layout.describe()} (train it with `shardwright train "
              f"{args.write}` in a world of {world}, or `shardwright submit {args.write}`)")
    return 0


def unit_of_bytes(n: float) -> tuple[str, float]:
    """GiB for what a large model needs, MiB below a tenth of one (a small model's plan is not all 0.0 GiB)."""
    return ("GiB", GIB) if n >= GIB / 10 else ("MiB", 2**20)


def unit_of_seconds(t: float) -> tuple[str, float]:
    return ("s", 1.0) if t >= 0.1 else ("ms", 1e-3) if t >= 1e-4 else ("µs", 1e-6)


def size(n: float) -> str:
    unit, scale = unit_of_bytes(n)
    return f"{n / scale:.1f} {unit}"


def duration(t: float) -> str:
    unit, scale = unit_of_seconds(t)
    return f"{t / scale:.2f} {unit}"


def describe(p: Plan, c: Candidate) -> str:
    tokens_per_gpu = c.cfg.train.global_batch_size * c.cfg.train.seq_len / (c.time.total * p.world)
    return (f"{c.layout.describe()}: {size(c.memory.total)} per GPU, step {duration(c.time.total)}, "
            f"{tokens_per_gpu:,.0f} tokens/s per GPU, MFU {100 * c.time.mfu(p.device, p.world):.1f}%")


def terms(c: Candidate) -> str:
    """The memory and time terms of a candidate, each line in the unit of its largest term."""
    bytes_unit, bytes_scale = unit_of_bytes(max(c.memory.terms.values()))
    time_unit, time_scale = unit_of_seconds(max(c.time.terms.values()))
    memory = ", ".join(f"{name} {scaled(value, bytes_scale, 1)}" for name, value in c.memory.terms.items() if value)
    time = ", ".join(f"{name} {scaled(value, time_scale, 2)}" for name, value in c.time.terms.items() if value)
    return f"memory {bytes_unit}: {memory} | time {time_unit}: {time}"


def scaled(value: float, scale: float, decimals: int) -> str:
    """value / scale with `decimals` decimals; a term too small for them keeps one significant digit instead of
    reading 0.0 beside the terms it is listed with."""
    x = value / scale
    return f"{x:.{decimals}f}" if round(x, decimals) else f"{x:.1g}"


def print_own_layout(cfg, p: Plan) -> None:
    try:
        own = evaluate(cfg, p.world, p.device)
    except UserError as e:
        print(f"the config's own layout cannot run on {p.world} GPUs: {e}")
        return
    verdict = "fits" if p.fits(own) else (f"does not fit: largest term {own.memory.largest()} "
                                          f"{size(own.memory.terms[own.memory.largest()])}")
    print(f"the config's own layout: {describe(p, own)}; {verdict}")


def print_families(p: Plan) -> None:
    """Why each family of layouts loses to the best: its best member is slower (by which term) or does not fit
    (by which term)."""
    if not p.best_per_family:
        return
    winner = p.ranked[0] if p.ranked else None
    print("why the other families lose:")
    for name, c in sorted(p.best_per_family.items(), key=lambda item: item[1].time.total):
        if winner is not None and c is winner:
            continue
        if not p.fits(c):
            largest = c.memory.largest()
            print(f"  {name}: does not fit: its smallest, {c.layout.describe()}, needs {size(c.memory.total)}; "
                  f"largest term {largest} {size(c.memory.terms[largest])}")
        elif winner is not None and c.time.total < 1.01 * winner.time.total:
            print(f"  {name}: best {c.layout.describe()} is as fast (within 1%) but needs {size(c.memory.total)} "
                  f"per GPU against {size(winner.memory.total)}")
        elif winner is not None:
            extra = {k: v - winner.time.terms.get(k, 0.0) for k, v in c.time.terms.items()}
            worst = max(extra, key=extra.get)
            print(f"  {name}: best {c.layout.describe()} is {100 * (c.time.total / winner.time.total - 1):.0f}% "
                  f"slower, most of it {worst} (+{duration(extra[worst])})")
