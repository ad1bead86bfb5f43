"""Step time of a layout on a device profile: FLOPs over a derated peak, each collective's bytes over the
bandwidth of the link its group spans (NVLink inside a node, the network across nodes), what overlaps with
compute, and the pipeline bubble. A roofline, not a simulation: docs/plan.md says what it leaves out."""
from dataclasses import dataclass
from functools import cached_property

from launcher.errors import UserError
from parallel.data_parallel import uses_fsdp
from parallel.mesh import MESH_DIMS
from planner.devices import DEVICES_FILE, devices
from planner.memory import GRAD_BYTES, Layout, stage_pieces
from planner.probe import ProbedModel


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    peak_flops: float  # FLOP/s of the compute dtype
    memory_bytes: float
    nvlink_bytes_per_s: float
    network_bytes_per_s: float
    matmul_efficiency: float
    gpus_per_node: int


def device(key: str, gpus_per_node: int, memory_gib: float | None = None, matmul_efficiency: float | None = None,
           dtype: str = "bf16") -> Device:
    profiles = devices()
    if key not in profiles:
        raise UserError(f"--gpu {key} has no profile; known: {', '.join(profiles)} (add one to {DEVICES_FILE})")
    p = profiles[key]
    return Device(key, p["name"], p["peak_tflops"][dtype] * 1e12, (memory_gib or p["memory_gib"]) * 2**30,
                  p["nvlink_gbps"] * 1e9, p["network_gbps"] * 1e9, matmul_efficiency or p["matmul_efficiency"],
                  gpus_per_node)


# Extra forward compute of activation checkpointing, as a share of a step's FLOPs (forward = 1/3 of them):
# full recomputes every block's forward; selective only the pointwise ops between matmuls (few FLOPs).
RECOMPUTE = {"none": 0.0, "full": 1 / 3, "selective": 0.0}


@dataclass(frozen=True)
class StepTime:
    terms: dict[str, float]  # seconds by what takes them (exposed: what does not overlap with compute)
    model_flops: float  # of the step, all ranks, without recomputation

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def mfu(self, dev: Device, world: int) -> float:
        return self.model_flops / (self.total * world * dev.peak_flops)


class StepModel:
    """Step time of `layout` for a model whose pieces were probed for one micro-batch of the layout."""

    def __init__(self, model: ProbedModel, layout: Layout, dev: Device, flops_per_token: float, seq_len: int,
                 global_batch: int, compute_bytes: int, attention_share: float):
        self.model, self.layout, self.dev, self.dims = model, layout, dev, layout.dims
        self.flops_per_token, self.seq_len, self.global_batch = flops_per_token, seq_len, global_batch
        self.attention_share = attention_share  # of the step's FLOPs: the attention the cp ring overlaps with
        self.compute_bytes = compute_bytes
        self.n_micro = global_batch // (layout.micro_batch_size * layout.dims.dp)

    def bandwidth(self, dim: str) -> float:
        """Of the groups of mesh dim `dim` (or "ep", the innermost part of dp_shard x cp): NVLink when one group's
        ranks share a node, else the network."""
        if dim == "ep":
            return self._link(self.dims.ep * self.dims.tp)
        inner = 1
        for name in reversed(MESH_DIMS):  # inner to outer: a dim's ranks are `inner` apart
            if name == dim:
                break
            inner *= getattr(self.dims, name)
        return self._link(getattr(self.dims, dim) * inner)

    def _link(self, extent: int) -> float:
        """A group whose ranks lie within `extent` consecutive ranks."""
        return self.dev.nvlink_bytes_per_s if extent <= self.dev.gpus_per_node else self.dev.network_bytes_per_s

    @cached_property
    def held(self) -> list:
        """The pieces of the most loaded pipeline rank (the first: embedding, and the most in flight)."""
        return [p for _, stage in stage_pieces(self.model, self.layout, 0) for p in stage]

    def predict(self) -> StepTime:
        dims, dev, layout = self.dims, self.dev, self.layout
        model_flops = self.flops_per_token * self.global_batch * self.seq_len
        compute = model_flops * (1 + RECOMPUTE[layout.activation_checkpoint]) / (
            dims.world_size * dev.peak_flops * dev.matmul_efficiency)
        terms = {"compute": compute}
        forwards = 3 if layout.activation_checkpoint == "full" else 2  # passes that gather: forward, backward, recompute
        hidden_bytes = self.model.hidden_elements * self.compute_bytes
        layers = [p for p in self.held if p not in (self.model.first, self.model.last)]
        per_rank_layers = len(layers) * self.n_micro
        if dims.tp > 1:  # sequence parallel: an all-gather and a reduce-scatter around attention and around the MLP
            volume = 4 * forwards * per_rank_layers * (dims.tp - 1) / dims.tp * hidden_bytes
            terms["tp collectives"] = volume / self.bandwidth("tp")
        if dims.cp > 1:  # the ring passes keys and values cp - 1 times forward, and them and their gradients back
            kv_bytes = sum(p.memory.kv_elements for p in layers) * self.compute_bytes / dims.tp
            ring = (forwards + 2) * (dims.cp - 1) * kv_bytes * self.n_micro / self.bandwidth("cp")
            terms["cp ring (exposed)"] = max(0.0, ring - compute * self.attention_share)
        if dims.ep > 1:  # all-to-all of each routed copy's hidden state: dispatch and combine, forward and back
            routed_bytes = sum(p.memory.routed for p in layers) * self.hidden_dim() * self.compute_bytes / dims.tp
            volume = 2 * forwards * (dims.ep - 1) / dims.ep * routed_bytes * self.n_micro
            terms["ep all-to-all"] = volume / self.bandwidth("ep")
        if uses_fsdp(dims):  # per micro-batch: gather for forward and backward, reduce-scatter the gradients
            params = sum(p.params for p in self.held) / dims.tp
            shard = dims.dp_shard * dims.cp
            volume = (shard - 1) / shard * params * (2 * self.compute_bytes + GRAD_BYTES) * self.n_micro
            terms["FSDP collectives (exposed)"] = max(0.0, volume / self.bandwidth("dp_shard") - compute)
        if dims.dp_replicate > 1:  # all-reduce of the (sharded) gradients once a step, behind the backward
            params = sum(p.params for p in self.held) / (dims.tp * (dims.dp_shard * dims.cp if uses_fsdp(dims) else 1))
            allreduce = 2 * (dims.dp_replicate - 1) / dims.dp_replicate * params * GRAD_BYTES
            terms["dp all-reduce (exposed)"] = max(0.0, allreduce / self.bandwidth("dp_replicate") - 2 / 3 * compute)
        if dims.pp > 1:  # idle while the pipeline fills and drains
            busy = sum(terms.values())
            terms["pipeline bubble"] = busy * (dims.pp - 1) / (self.n_micro * layout.pp_stages_per_rank)
        return StepTime(terms, model_flops)

    def hidden_dim(self) -> int:
        """Width of one token's hidden state: the probe's hidden state per token."""
        return self.model.hidden_elements // (self.layout.micro_batch_size * self.seq_len // self.dims.cp)
