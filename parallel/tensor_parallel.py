"""Megatron-style tensor and sequence parallelism on DTensor, as reusable plan pieces.

Column-parallel linears split their output features over the tp ranks, row-parallel linears
their input features; a column -> row pair needs one collective at its end. With sequence
parallelism the activations between those pairs (norms, residual stream) are sharded on the
sequence dim instead of replicated: the row-parallel all-reduce becomes a reduce-scatter and an
all-gather moves to the entry of the next column-parallel pair. Same bytes, 1/tp of the
activation memory outside the pairs.
"""
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel
from torch.distributed.tensor.parallel.style import ParallelStyle


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly sharded (DTensor) tensor, as a plain tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def residual_layout(sequence_parallel: bool):
    """How the residual stream between blocks is laid out over the tp ranks."""
    return Shard(1) if sequence_parallel else Replicate()


def column_row_pair(entry: str, columns: list[str], rows: list[str], sequence_parallel: bool,
                    n_extra_inputs: int = 0, column_styles: dict[str, ParallelStyle] | None = None) -> dict:
    """Plan for a sub-module `entry` whose `columns` are column-parallel and `rows` row-parallel.

    The entry's first input is the residual stream (gathered here under sequence parallelism);
    its other `n_extra_inputs` inputs (e.g. RoPE tables) are left as they are. `column_styles`
    replaces the plain column-parallel style for some columns (see ReplicatedKVProjection).
    """
    stream = residual_layout(sequence_parallel)
    extra = (None,) * n_extra_inputs
    plan = {entry: PrepareModuleInput(input_layouts=(stream, *extra), desired_input_layouts=(Replicate(), *extra))}
    plan.update({f"{entry}.{name}": (column_styles or {}).get(name, ColwiseParallel()) for name in columns})
    plan.update({f"{entry}.{name}": RowwiseParallel(output_layouts=stream) for name in rows})
    return plan


class ReplicatedKVProjection(ParallelStyle):
    """A k or v projection when tp exceeds the number of kv heads (GQA/MQA).

    The weight is replicated over tp; every rank computes all kv heads and keeps the one its query
    heads attend with (rank r holds query heads [r H/tp, (r+1) H/tp), which share kv head
    r // (tp / n_kv_heads)). The kept slice's gradient is different on each rank, so the output is
    declared Partial in backward: DTensor sums the weight and input gradients over tp.
    """

    def __init__(self, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()
        head = device_mesh.get_local_rank() // (tp // self.n_kv_heads)

        def replicate_input(_module, inputs, mesh):
            x = inputs[0]
            return x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Replicate()], run_check=False)

        def keep_own_head(_module, output, _mesh):
            local = output.to_local(grad_placements=[Partial()])
            return local.narrow(-1, head * self.head_dim, self.head_dim)

        return distribute_module(module, device_mesh, input_fn=replicate_input, output_fn=keep_own_head)


def _hook_io(module: nn.Module, input_fn, output_fn) -> nn.Module:
    """Install input_fn(inputs) -> inputs and output_fn(output) -> output around `module`'s forward, leaving its
    parameters as they are (distribute_module would make every plain one a Replicate DTensor)."""
    module.register_forward_pre_hook(lambda _module, inputs: input_fn(inputs))
    module.register_forward_hook(lambda _module, _inputs, output: output_fn(output))
    return module


class PartialSumRegion(ParallelStyle):
    """A whole module whose split weights make its output a partial sum over tp, run on plain tensors:
    Megatron's column -> row pair drawn around a module that sorts, indexes or routes its rows (which
    DTensor ops would not express), e.g. a layer of experts each split by hidden unit.

    In: the stream (`stream_layout`) gathered to the full input (an all-gather under sequence
    parallelism) and handed over as a plain tensor whose gradient is this rank's partial share: the
    backward sums the shares into the stream layout (reduce-scatter; all-reduce without SP).
    Out: the plain partial output summed into the stream layout (reduce-scatter; all-reduce); its
    gradient comes back whole on every rank.
    So every gradient inside the region must be a partial share: parts that are not split go through
    `ReplicatedInRegion`, column -> row pairs through `column_row_pair_in_region`."""

    def __init__(self, stream_layout):
        super().__init__()
        self.stream_layout = stream_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        mesh, stream = device_mesh, [self.stream_layout]

        def gather(inputs):
            x = inputs[0]  # a DTensor from a sequence-parallel norm, else plain
            x = x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, stream, run_check=False)
            x = x.redistribute(mesh, [Replicate()])
            return (x.to_local(grad_placements=[Partial()]), *inputs[1:])

        def reduce(output):
            return DTensor.from_local(output, mesh, [Partial()], run_check=False).redistribute(mesh, stream).to_local()

        return _hook_io(module, gather, reduce)


class ReplicatedInRegion(ParallelStyle):
    """A module inside a PartialSumRegion whose weights are not split (e.g. a router): every tp rank
    computes the same outputs and gets the same weight gradients (no tp reduction). At its borders the
    gradients change kind: its input's gradient leaves as a share (the whole divided by tp: exact for a
    power of two) so that the region's sum counts it once, and the outputs `partial_grad_outputs` (by position), which
    scale split computations, get partial gradients that are summed over tp here (an all-reduce of
    their size)."""

    def __init__(self, partial_grad_outputs: tuple[int, ...]):
        super().__init__()
        self.partial_grad_outputs = partial_grad_outputs

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        mesh = device_mesh

        def share_grad(inputs):
            x = DTensor.from_local(inputs[0], mesh, [Replicate()], run_check=False, grad_placements=[Partial()])
            return (x.to_local(grad_placements=[Replicate()]), *inputs[1:])  # backward: Replicate -> Partial (/ tp)

        def sum_grad(output: torch.Tensor) -> torch.Tensor:  # backward: Partial -> Replicate, an all-reduce
            replicated = DTensor.from_local(output, mesh, [Replicate()], run_check=False)
            return replicated.to_local(grad_placements=[Partial()])

        def sum_grads(outputs):
            return tuple(sum_grad(o) if i in self.partial_grad_outputs else o for i, o in enumerate(outputs))

        return _hook_io(module, share_grad, sum_grads)


class _PairInRegion(ParallelStyle):
    """The entry of a column -> row pair inside a PartialSumRegion: the region's plain input as a
    Replicate DTensor whose gradient stays this rank's share (the region sums it), and the pair's
    Partial output back as a plain partial tensor whose gradient arrives whole."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def as_replicate(inputs):
            x = DTensor.from_local(inputs[0], device_mesh, [Replicate()], run_check=False, grad_placements=[Partial()])
            return (x, *inputs[1:])

        def as_partial(output):
            return output.to_local(grad_placements=[Replicate()])

        return _hook_io(module, as_replicate, as_partial)


def column_row_pair_in_region(entry: str, columns: list[str], rows: list[str]) -> dict:
    """Plan for a sub-module `entry` of a PartialSumRegion whose `columns` are column-parallel and `rows`
    row-parallel; its output joins the region's partial sum unreduced."""
    plan = {entry: _PairInRegion()}
    plan.update({f"{entry}.{name}": ColwiseParallel() for name in columns})
    plan.update({f"{entry}.{name}": RowwiseParallel(output_layouts=Partial(), use_local_output=False) for name in rows})
    return plan


def norm_plan(names: list[str], sequence_parallel: bool) -> dict:
    """Norms run on sequence shards under sequence parallelism; otherwise on the replicated stream."""
    return {name: SequenceParallel() for name in names} if sequence_parallel else {}


def vocab_parallel_embedding(sequence_parallel: bool) -> RowwiseParallel:
    """Embedding rows (vocab) split over tp; the partial lookups are summed (or reduce-scattered)."""
    return RowwiseParallel(input_layouts=Replicate(), output_layouts=residual_layout(sequence_parallel))


def vocab_parallel_head(sequence_parallel: bool, loss_parallel: bool) -> ColwiseParallel:
    """Output head split over vocab. With loss parallelism the logits stay vocab-sharded DTensors
    and cross entropy runs under `torch.distributed.tensor.parallel.loss_parallel` without ever
    gathering the full logits; otherwise they are gathered."""
    return ColwiseParallel(input_layouts=residual_layout(sequence_parallel),
                           output_layouts=Shard(-1) if loss_parallel else Replicate(),
                           use_local_output=not loss_parallel)


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Let inductor split TP matmuls and overlap them with their collectives (symmetric memory).
    CUDA and torch.compile only; the trainer refuses it elsewhere."""
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)


@torch.no_grad()
def reduce_partial_grads(params) -> None:
    """Sum, once, the gradients DTensor left Partial over tp (norm gains under sequence parallelism,
    replicated kv projections). Left Partial, every later op on them (clipping, each AdamW foreach
    op) would all-reduce them again (benchmarks/tp_comm.py counted 4 all-reduces per gradient)."""
    for p in params:
        grad = p.grad
        if isinstance(grad, DTensor) and any(placement.is_partial() for placement in grad.placements):
            p.grad = grad.redistribute(grad.device_mesh, p.placements)
