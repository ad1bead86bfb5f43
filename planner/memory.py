"""Per-rank memory of a layout: model state (parameters, gradients, AdamW) as FSDP / HSDP / DDP hold it,
FSDP's gathered units, and activations of the micro-batches a pipeline schedule keeps in flight, from the
pieces the meta-device probe measured (planner/probe.py)."""
from dataclasses import dataclass

from parallel.data_parallel import uses_fsdp
from parallel.mesh import ParallelDims
from parallel.pipeline import split_layers, stage_ids
from planner.probe import ProbedModel

MASTER_BYTES = 4  # fp32 parameters: the optimizer steps them (FSDP casts a gathered copy for compute)
GRAD_BYTES = 4  # fp32 gradients (FSDP's reduce dtype)
ADAM_BYTES = 8  # exp_avg and exp_avg_sq, fp32


@dataclass(frozen=True)
class Layout:
    dims: ParallelDims
    micro_batch_size: int
    activation_checkpoint: str  # none | full | selective
    pp_schedule: str = "1f1b"
    pp_stages_per_rank: int = 1
    pp_layout: str = ""  # explicit stages (parallel.pp_layout); "": balanced

    def describe(self) -> str:
        pipeline = f" {self.pp_schedule}" + (f" x{self.pp_stages_per_rank}" if self.pp_stages_per_rank > 1 else "") \
            if self.dims.pp > 1 else ""
        return f"{self.dims.describe()}{pipeline} mbs={self.micro_batch_size} ac={self.activation_checkpoint}"


def in_flight(schedule: str, stage: int, n_stages: int, n_micro: int) -> int:
    """Micro-batches whose forward activations pipeline stage `stage` of `n_stages` holds at once. gpipe: all
    forwards before any backward. The others start a stage's backwards once the last stage has run the first
    micro-batch, so stage s holds up to n_stages - s forwards (1F1B's rule, applied to the virtual stages of
    the interleaved and V schedules alike; benchmarks/plan_memory.py checks it against each)."""
    return n_micro if schedule == "gpipe" else min(n_micro, n_stages - stage)


def stages_of_rank(n_layers: int, layout: Layout, pp_rank: int) -> list[tuple[int, list[int]]]:
    """(stage index, its layer ids) of each stage the rank holds: the trainer's own split."""
    layers = split_layers(n_layers, layout.dims.pp * layout.pp_stages_per_rank, layout.pp_layout)
    return [(s, layers[s]) for s in stage_ids(pp_rank, layout.dims.pp, layout.pp_schedule, layout.pp_stages_per_rank)]


@dataclass(frozen=True)
class RankMemory:
    terms: dict[str, float]  # bytes by what holds them
    pp_rank: int

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def largest(self) -> str:
        return max(self.terms, key=self.terms.get)


def stage_pieces(model: ProbedModel, layout: Layout, pp_rank: int) -> list[tuple[int, list]]:
    """(stage index, its pieces) of each stage pipeline rank `pp_rank` holds."""
    last_stage = layout.dims.pp * layout.pp_stages_per_rank - 1
    return [(s, [*([model.first] if s == 0 else []), *(model.layers[i] for i in ids),
                 *([model.last] if s == last_stage else [])])
            for s, ids in stages_of_rank(len(model.layers), layout, pp_rank)]


def rank_memory(model: ProbedModel, layout: Layout, n_micro: int, compute_bytes: int, pp_rank: int) -> RankMemory:
    """Bytes on one rank of pipeline rank `pp_rank`. The pieces were measured for one micro-batch of this
    layout's rows and tokens per cp rank, unsharded by tp."""
    dims = layout.dims
    first, last = model.first, model.last
    pieces = stage_pieces(model, layout, pp_rank)
    held = [p for _, stage in pieces for p in stage]
    dense = sum(p.params - p.expert_params for p in held) / dims.tp
    experts = sum(p.expert_params for p in held) / (dims.tp * dims.ep)
    terms = {}
    if uses_fsdp(dims):
        local = dense / (dims.dp_shard * dims.cp) + experts / (dims.dp_shard * dims.cp // dims.ep)
        # The root unit (what is not a block: embedding, final norm, head) stays gathered from its forward to
        # its backward; a block is gathered while it runs and the next one is prefetched.
        root = sum(p.params for p in held if p in (first, last)) / dims.tp
        block = max((p.params for p in held if p not in (first, last)), default=0) / dims.tp  # a layer: one unit
        gathered = (root + 2 * block) * compute_bytes
    else:
        local, gathered = dense + experts, 0.0
    terms["parameters"] = local * MASTER_BYTES
    terms["optimizer states"] = local * ADAM_BYTES
    if gathered:
        terms["FSDP gathered units"] = gathered
    if not uses_fsdp(dims) and dims.dp_replicate > 1:  # DDP: gradients are copied into buckets to all-reduce
        terms["DDP gradient buckets"] = local * GRAD_BYTES
    # Activations: each stage's retained bytes for every micro-batch in flight, and on top what the piece whose
    # backward runs needs beyond that. Gradients: once a step's first backward is through (a second micro-batch,
    # a pipeline), all of them exist; in a one-micro-batch step only those of the pieces already back-propagated.
    n_stages = dims.pp * layout.pp_stages_per_rank
    retained = [(in_flight(layout.pp_schedule, s, n_stages, n_micro) if dims.pp > 1 else 1) * p.memory.retained
                for s, stage in pieces for p in stage]
    grads = [local * GRAD_BYTES * (p.params / max(sum(q.params for q in held), 1)) for p in held]
    all_grads = n_micro > 1 or dims.pp > 1
    moments = [((sum(retained[:j + 1]) + held[j].memory.peak - held[j].memory.retained) / dims.tp,
                sum(grads) if all_grads else sum(grads[j + 1:])) for j in range(len(held))]
    activations, gradients = max(moments, key=sum)
    terms["activations"] = activations
    terms["gradients"] = gradients
    if dims.pp > 1 and last in held:  # torch's stage keeps each micro-batch's output from its forward to its backward
        terms["pipeline outputs until backward"] = \
            in_flight(layout.pp_schedule, n_stages - 1, n_stages, n_micro) * last.memory.output / dims.tp
    return RankMemory(terms, pp_rank)


def peak_rank_memory(model: ProbedModel, layout: Layout, n_micro: int, compute_bytes: int) -> RankMemory:
    """The rank with the most bytes (pipeline ranks differ; the others of a pp rank hold the same)."""
    return max((rank_memory(model, layout, n_micro, compute_bytes, r) for r in range(layout.dims.pp)),
               key=lambda m: m.total)
