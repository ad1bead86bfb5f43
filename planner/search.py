"""`shardwright plan`: enumerate the layouts `train` would accept for a config on a cluster, predict memory and
step time of each, rank those that fit, and say why each other family of layouts loses (docs/plan.md)."""
import copy
import dataclasses
from dataclasses import dataclass

import torch

from launcher.config import Config
from launcher.errors import UserError
from models import get_model_spec
from parallel.activation_checkpoint import MODES as AC_MODES
from parallel.mesh import ParallelDims
from planner.memory import Layout, RankMemory, peak_rank_memory
from planner.predict import layout_of, pieces_for
from planner.step_time import Device, StepModel, StepTime

# Pipeline schedules the search tries (with stages per rank); the others are reachable by writing the config.
PP_SCHEDULES = (("1f1b", 1), ("interleaved-1f1b", 2))
USABLE_MEMORY = 0.95  # of the device's memory: the rest for the CUDA context, allocator slack and NCCL


@dataclass(frozen=True)
class Candidate:
    cfg: Config  # the config that trains this layout
    layout: Layout
    memory: RankMemory
    time: StepTime


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def family(cfg: Config) -> str:
    """The family of a layout: which kinds of parallelism it uses (fsdp: dp_shard > 1; dp_replicate: DDP or
    HSDP replicas)."""
    p = cfg.parallel
    used = [name for name, size in (("dp_replicate", p.dp_replicate), ("fsdp", p.dp_shard), ("tp", p.tp),
                                    ("pp", p.pp), ("cp", p.cp), ("ep", p.ep)) if size > 1]
    return "+".join(used) or "single"


def layouts(cfg: Config, world: int, gpus_per_node: int):
    """Configs for every layout of `world` ranks to try: tp within a node, the rest any way the world divides;
    micro-batch sizes that divide a dp rank's share; every checkpointing mode."""
    spec = get_model_spec(cfg.model.family)
    n_layers = spec.n_layers(cfg.model_config()) if spec.n_layers else 1
    t = cfg.train
    for tp in divisors(gpus_per_node):
        for cp in divisors(world // tp) if world % tp == 0 else []:
            for pp in (d for d in divisors(world // (tp * cp)) if d <= n_layers):
                rest = world // (tp * cp * pp)
                for dp_replicate in divisors(rest):
                    dp_shard = rest // dp_replicate
                    dp = dp_replicate * dp_shard
                    if t.global_batch_size % dp:
                        continue
                    for ep in divisors(dp_shard * cp) if spec.plan.experts else [1]:
                        for mbs in divisors(t.global_batch_size // dp):
                            for schedule, per_rank in PP_SCHEDULES if pp > 1 else (("1f1b", 1),):
                                for ac in AC_MODES:
                                    out = copy.deepcopy(cfg)
                                    out.parallel = dataclasses.replace(
                                        cfg.parallel, dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp,
                                        pp=pp, ep=ep, pp_schedule=schedule, pp_stages_per_rank=per_rank,
                                        pp_layout="")
                                    out.train = dataclasses.replace(t, micro_batch_size=mbs, activation_checkpoint=ac)
                                    yield out


def evaluate(cfg: Config, world: int, dev: Device) -> Candidate:
    """Memory and step time of cfg's layout (validated as `train` validates it: UserError if it cannot run)."""
    layout, n_micro = layout_of(cfg, world)
    dtype = torch.bfloat16
    model = pieces_for(cfg, layout, dtype)
    spec = get_model_spec(cfg.model.family)
    model_cfg, seq_len = cfg.model_config(), cfg.train.seq_len
    flops = spec.flops_per_token(model_cfg, seq_len)
    # Causal attention's share of the FLOPs (seq_len (seq_len + 1) / 2 pairs a row); unknown: none, so the ring
    # context parallelism passes counts as exposed.
    attention = spec.flops_per_attention_pair(model_cfg) * (seq_len + 1) / 2 / flops \
        if spec.flops_per_attention_pair else 0.0
    time = StepModel(model, layout, dev, flops, seq_len, cfg.train.global_batch_size, dtype.itemsize,
                     attention).predict()
    return Candidate(cfg, layout, peak_rank_memory(model, layout, n_micro, dtype.itemsize), time)


@dataclass
class Plan:
    world: int
    device: Device
    ranked: list[Candidate]  # layouts that fit, fastest first
    best_per_family: dict[str, Candidate]  # fitting or not: the fastest that fits, else the smallest
    tried: int
    valid: int

    def fits(self, c: Candidate) -> bool:
        return c.memory.total <= USABLE_MEMORY * self.device.memory_bytes


def plan(cfg: Config, world: int, dev: Device) -> Plan:
    tried, candidates, problems = 0, [], {}
    for option in layouts(cfg, world, dev.gpus_per_node):
        tried += 1
        try:
            candidates.append(evaluate(option, world, dev))
        except UserError as e:
            problems[str(e)] = problems.get(str(e), 0) + 1
    if len(problems) == 1 and not candidates:  # every layout refused alike: the config's mistake, not the world's
        raise UserError(next(iter(problems)))
    if not candidates:
        common = max(problems, key=problems.get) if problems else "no layout to try"
        raise UserError(f"{world} GPUs are more than this model and batch can use: every layout (tp within a node, "
                        f"pp up to the layers, cp, dp dividing train.global_batch_size={cfg.train.global_batch_size}) "
                        f"is refused, most often: {common}; use fewer GPUs or a larger global batch")
    result = Plan(world, dev, [], {}, tried, len(candidates))
    result.ranked = sorted((c for c in candidates if result.fits(c)), key=lambda c: (c.time.total, c.memory.total))
    for c in candidates:
        best = result.best_per_family.get(family(c.cfg))
        if best is None or _better(result, c, best):
            result.best_per_family[family(c.cfg)] = c
    return result


def _better(p: Plan, a: Candidate, b: Candidate) -> bool:
    if p.fits(a) != p.fits(b):
        return p.fits(a)
    return (a.time.total, a.memory.total) < (b.time.total, b.memory.total) if p.fits(a) \
        else a.memory.total < b.memory.total


def one_layer_bytes(cfg: Config, dev: Device) -> float:
    """The least one layer can take on one GPU: its largest layer's parameters gathered in bf16 at the most tp a
    node allows, and one row's activations under full checkpointing."""
    tp = dev.gpus_per_node
    model = pieces_for(cfg, Layout(ParallelDims(1, 1, 1, 1, 1, 1, 1), 1, "full"), torch.bfloat16)
    return max(p.params * torch.bfloat16.itemsize / tp + p.memory.peak / tp for p in model.layers)
