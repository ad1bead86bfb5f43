"""ParallelDims: the layout of a run, validated once, turned into one named DeviceMesh."""
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # outer to inner


class LayoutError(ValueError):
    """An impossible or unsupported parallel layout (printed to the user as one line)."""


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    ep: int
    world_size: int

    @classmethod
    def resolve(cls, *, dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1, world_size: int) -> "ParallelDims":
        """Validate a layout against the world size; dp_shard=-1 takes whatever is left."""
        named = dict(dp_replicate=dp_replicate, cp=cp, tp=tp, pp=pp, ep=ep)
        for name, size in named.items():
            if size < 1:
                raise LayoutError(f"parallel.{name}={size} must be >= 1")
        if dp_shard == 0 or dp_shard < -1:
            raise LayoutError(f"parallel.dp_shard={dp_shard} must be >= 1, or -1 for 'whatever is left'")
        others = dp_replicate * cp * tp * pp
        if dp_shard == -1:
            if world_size % others:
                raise LayoutError(
                    f"world size {world_size} is not divisible by dp_replicate*cp*tp*pp = {others}; "
                    f"change the layout or the number of processes")
            dp_shard = world_size // others
        if dp_shard * others != world_size:
            raise LayoutError(
                f"parallel dims multiply to {dp_shard * others} (dp_replicate={dp_replicate} x dp_shard={dp_shard}"
                f" x cp={cp} x tp={tp} x pp={pp}) but the world has {world_size} processes; make them equal "
                f"(dp_shard=-1 fills in the rest)")
        if (dp_shard * cp) % ep:
            raise LayoutError(f"parallel.ep={ep} must divide dp_shard*cp = {dp_shard * cp} (experts borrow those ranks)")
        return cls(dp_replicate, dp_shard, cp, tp, pp, ep, world_size)

    def describe(self) -> str:
        """e.g. 'dp_replicate=1 dp_shard=2 tp=2': the dp dims always, the others when in use."""
        used = [n for n in ("cp", "tp", "pp", "ep") if getattr(self, n) > 1]
        return " ".join(f"{n}={getattr(self, n)}" for n in ("dp_replicate", "dp_shard", *used))

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different slices of the global batch are processed."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> "Meshes":
        world = init_device_mesh(device_type, tuple(getattr(self, d) for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
        batch = world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        # FSDP shards over dp_shard x cp (cp ranks hold the same weights, see different tokens);
        # for HSDP, replicated over dp_replicate: the batch mesh cut into (replicate, shard).
        fsdp = batch._unflatten(0, (self.dp_replicate, self.dp_shard * self.cp), ("fsdp_replicate", "fsdp_shard")) \
            if self.dp_replicate > 1 else world["dp_shard", "cp"]._flatten("dp_shard_cp")
        # Expert parallelism borrows ranks of dp_shard x cp: that dim cut into (efsdp, ep), ep inner.
        # Expert weights are sharded over ep, and FSDP shards them over efsdp (x dp_replicate: HSDP).
        # Built only when ep > 1 (new process groups).
        ep = expert_fsdp = None
        if self.ep > 1:
            shard_cp = self.dp_shard * self.cp
            experts = batch._unflatten(0, (self.dp_replicate, shard_cp // self.ep, self.ep),
                                       ("efsdp_replicate", "efsdp", "ep"))
            ep = experts["ep"]
            expert_fsdp = experts["efsdp_replicate", "efsdp"] if self.dp_replicate > 1 else experts["efsdp"]
        # Expert weights are split by expert over ep and by hidden unit over tp (expert tensor parallelism):
        # the dims of the two in use, as one mesh (ep, tp) when both are.
        split = [mesh for mesh, size in ((ep, self.ep), (world["tp"], self.tp)) if size > 1]
        expert_split = DeviceMesh._concatenate(split) if len(split) == 2 else next(iter(split), None)
        return Meshes(world=world, dp=world["dp_replicate", "dp_shard"]._flatten("dp"), tp=world["tp"],
                      pp=world["pp"], cp=world["cp"], fsdp=fsdp, batch=batch, ep=ep, expert_fsdp=expert_fsdp,
                      expert_split=expert_split)


@dataclass(frozen=True)
class Meshes:
    """The run's one mesh (all five named dims, size-1 dims included) and the flattened views of
    it that collectives need; every process group in the code comes from here."""
    world: DeviceMesh
    dp: DeviceMesh  # dp_replicate x dp_shard: ranks that see different slices of the global batch
    tp: DeviceMesh  # ranks that split each layer's heads / hidden units
    pp: DeviceMesh  # ranks that hold consecutive pipeline stages
    cp: DeviceMesh  # ranks that split each sequence
    fsdp: DeviceMesh  # what FSDP shards over: dp_shard x cp (2-D with dp_replicate for HSDP)
    batch: DeviceMesh  # dp x cp: ranks holding different tokens of a step (loss and token counts)
    ep: DeviceMesh | None = None  # expert parallelism (ep > 1 only): ranks of dp_shard x cp that split the experts
    expert_fsdp: DeviceMesh | None = None  # what FSDP shards expert weights over: dp_shard x cp / ep (x dp_replicate)
    expert_split: DeviceMesh | None = None  # what expert weights are split over: ep and/or tp (those > 1), ep outer
