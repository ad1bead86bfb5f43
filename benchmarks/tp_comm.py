"""Bytes moved by tensor-parallel collectives in one LLM micro-step, counted (not timed) and
compared with Megatron's formula; JSON to benchmarks/results/tp_comm.json.

A micro-step is what `launcher/trainer.py` runs per micro-batch: under `loss_parallel()`,
forward, `cross_entropy_sum` times the loss scale, backward, on a model sharded by the family's
ParallelPlan through `parallelize`, with and without sequence parallelism. A TorchDispatchMode
sees every collective below DTensor (as CommDebugMode does) and records its phase, module (the
innermost one running, from ModTracker: a collective in a module's input hook lands on the module,
one in its output hook on its parent; "top" is outside every block), op, local input shapes, dtype and
group size; an unknown collective is an error, so nothing is missed. Bytes per rank are ring
traffic on S, the full tensor: all-reduce 2(t-1)/t S, all-gather (t-1)/t S_out, reduce-scatter
and all-to-all (t-1)/t S_in.

- tiny (configs/llm/tiny.yaml, fp32) runs for real in gloo worlds of tp=2 and tp=4, and the fake
  route below must count exactly the same collectives. These worlds also count what a step adds
  once after its micro-steps: `reduce_partial_grads`, `clip_grad_norm` and `Optimizers.step`.
- 1b (Llama-3.2-1B shape, untied, bf16 activations as under FSDP mixed precision) is counted in
  full, all 16 layers, without computing anything: one process is rank 0 of a "fake" process
  group (torch.testing._internal.distributed.fake_pg) and every tensor is a FakeTensor.

Megatron's formula (Narayanan et al. 2021; Korthikanti et al. 2022), A = b*s*h activation bytes,
f = (t-1)/t: every layer 2 all-reduces forward + 2 backward (with SP 4 all-gathers + 4
reduce-scatters), 8 f A; the vocab-parallel embedding's forward all-reduce, 2 f A (SP: a
reduce-scatter forward, an all-gather of its gradient backward); the head's backward all-reduce
of its input gradient, 2 f A (SP: all-gather + reduce-scatter); vocab-parallel cross entropy's 3
all-reduces of b*s fp32 values (max, sum of exps, target logit).

Megatron-LM's code (not the paper) re-gathers each column-parallel input in backward under SP to
save memory, +2 f A per layer; DTensor keeps the gathered input instead and matches the paper.

`partial_grads`: gradients left Partial after backward (norm gains under SP, kv projections
replicated when tp > n_kv_heads). Each needs one all-reduce per step, which the trainer's
`reduce_partial_grads` issues before clipping; `per_step` (gloo worlds only: the norm needs
.item()) counts what that, the clip and the optimizer actually issue.

    .venv/bin/python benchmarks/tp_comm.py [--out benchmarks/results/tp_comm.json]
"""
import argparse
import json
import re
import tempfile
from collections import Counter
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mod_tracker import ModTracker
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from launcher.config import load_config
from launcher.optim import Optimizers, clip_grad_norm
from parallel.tensor_parallel import reduce_partial_grads
from models import get_model_spec
from models.common.loss import cross_entropy_sum
from models.llm.model import LLMConfig
from models.spec import ModelSpec
from parallel.options import ParallelizeOptions
from parallel.init import init_parameters
from parallel.mesh import ParallelDims
from parallel.parallelize import parallelize

TINY = "configs/llm/tiny.yaml"
ONE_B = LLMConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                  ffn_dim_multiplier=1.5, rope_theta=500000.0)
ONE_B_BATCH, ONE_B_SEQ = 1, 2048
# op-name prefixes -> (ring traffic per rank / S, S / local input bytes) in a group of t ranks
RING = {("all_reduce", "allreduce_"): lambda t: (2 * (t - 1) / t, 1), ("all_gather",): lambda t: ((t - 1) / t, t),
        ("reduce_scatter",): lambda t: ((t - 1) / t, 1), ("all_to_all", "alltoall"): lambda t: ((t - 1) / t, 1)}


def ring(op: str, t: int) -> tuple[float, int]:
    return next(rule(t) for prefixes, rule in RING.items() if op.startswith(prefixes))


class CollectiveCounter(TorchDispatchMode):
    """Counts collectives by (phase, module, op, local input shapes, dtype, group size)."""

    def __init__(self, phase: str):
        super().__init__()
        self.phase, self.calls, self.modules = phase, Counter(), ModTracker()

    def __enter__(self):
        self.modules.__enter__()
        return super().__enter__()

    def __exit__(self, *args):
        super().__exit__(*args)
        self.modules.__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor turn into local ops and collectives first
        namespace, op = func.name().split("::")
        if namespace in ("_c10d_functional", "_c10d_functional_autograd", "c10d") and not op.startswith(("_", "wait")):
            if not any(op.startswith(prefixes) for prefixes in RING):
                raise RuntimeError(f"{func} is a collective this benchmark does not count")
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            group = (dist.ProcessGroup.unbox(next(a for a in args if isinstance(a, torch.ScriptObject)))
                     if namespace == "c10d" else _resolve_process_group(args[-1]))
            self.calls[(*self.where(), op, tuple(tuple(x.shape) for x in tensors), str(tensors[0].dtype)[6:],
                        group.size())] += 1
        return func(*args, **(kwargs or {}))

    def where(self) -> tuple[str, str]:
        """(phase, module) of the collective being issued: the innermost module running, from ModTracker,
        which names modules from the root's class name ("Transformer.layers.0.attention")."""
        module = max(self.modules.parents, key=lambda name: name.count(".")).partition(".")[2]
        return "backward" if self.modules.is_bw else self.phase, re.sub(r"layers\.\d+\.", "layers.*.", module) or "top"


def sharded_model(cfg, tp: int, sp: bool, dtype: torch.dtype, family: str = "llm"):
    """The family's model on the meta device, sharded as the trainer does (its ParallelPlan through
    `parallelize`; tp only, so no data parallelism), in an initialized tp world."""
    spec: ModelSpec = get_model_spec(family)
    dims = ParallelDims.resolve(tp=tp, dp_shard=1, world_size=tp)
    meshes = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = spec.model_cls(cfg).to(dtype)
    return parallelize(model, spec.plan, dims, meshes, ParallelizeOptions(sequence_parallel=sp)), meshes


def forward_backward(model, tokens: torch.Tensor, targets: torch.Tensor) -> None:
    """One micro-step as the trainer runs it: forward, loss sum times the loss scale, backward."""
    with loss_parallel():
        (cross_entropy_sum(model(tokens), targets) * torch.ones(())).backward()


def random_batch(cfg, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, cfg.vocab_size, (2, batch, seq_len)).unbind(0)


def micro_step(model, cfg, batch: int, seq_len: int) -> tuple[Counter, dict]:
    """Collectives of one micro-step as the trainer runs it, and the gradients it leaves Partial."""
    with CollectiveCounter("forward") as counter:
        forward_backward(model, *random_batch(cfg, batch, seq_len))
    partial = [p.grad for p in model.parameters()
               if isinstance(p.grad, DTensor) and any(x.is_partial() for x in p.grad.placements)]
    return counter.calls, {"count": len(partial), "bytes": sum(g.to_local().nbytes for g in partial)}


@contextmanager
def fake_group(tp: int):
    """A tp world of one process: rank 0 of a fake process group whose collectives do nothing."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fake_world(cfg: LLMConfig, tp: int, sp: bool, batch: int, seq_len: int, dtype: torch.dtype):
    with fake_group(tp):
        model, _ = sharded_model(cfg, tp, sp, dtype)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            return micro_step(model, cfg, batch, seq_len)


def gloo_rank(rank: int, tp: int, store: str, out: str, work, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=tp,
                            timeout=timedelta(seconds=120))
    results = work(tp, *args)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def gloo_world(tp: int, work, *args):
    """`work(tp, *args)` on every rank of a gloo world of tp processes (one thread each); rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="tp-comm-") as tmp:
        mp.spawn(gloo_rank, args=(tp, f"{tmp}/store", f"{tmp}/out.pt", work, args), nprocs=tp)
        return torch.load(f"{tmp}/out.pt", weights_only=False)


def steps(tp: int, cases: list, train) -> list:
    """(micro-step calls, partial grads, per-step calls) of each case (cfg, sp, batch, seq_len)."""
    results = []
    for cfg, sp, batch, seq_len in cases:
        model, meshes = sharded_model(cfg, tp, sp, torch.float32)
        model.to_empty(device="cpu")
        init_parameters(model, seed=0)
        optimizers = Optimizers([model], train)
        calls, partial = micro_step(model, cfg, batch, seq_len)
        with CollectiveCounter("reduce_partial_grads") as step:
            reduce_partial_grads(model.parameters())
            step.phase = "clip_grad_norm"
            clip_grad_norm(model.parameters(), train.grad_clip, meshes.pp.get_group())
            step.phase = "optimizer"
            optimizers.step()
        results.append((calls, partial, step.calls))
    return results


def megatron_bytes(cfg: LLMConfig, tp: int, tokens: int, act_bytes: int) -> float:
    """Megatron's per-rank bytes for one micro-step; the same with and without SP."""
    f, activation = (tp - 1) / tp, tokens * cfg.dim * act_bytes
    layers = cfg.n_layers * 8 * f * activation
    embedding = head = 2 * f * activation
    loss = 3 * 2 * f * tokens * 4  # fp32
    return layers + embedding + head + loss


def collectives(calls: Counter) -> tuple[list[dict], float]:
    rows = []
    for (phase, module, op, shapes, dtype, t), count in sorted(calls.items()):
        traffic, full = ring(op, t)
        tensor_bytes = full * sum(torch.Size(s).numel() for s in shapes) * getattr(torch, dtype).itemsize
        rows.append({"phase": phase, "module": module, "op": op, "local_shapes": shapes, "dtype": dtype, "group": t,
                     "count": count, "tensor_bytes": tensor_bytes, "bytes_per_rank": count * traffic * tensor_bytes})
    return rows, sum(r["bytes_per_rank"] for r in rows)


def report(name: str, cfg: LLMConfig, tp: int, sp: bool, batch: int, seq_len: int, dtype, route: str,
           calls: Counter, partial: dict, step_calls: Counter | None = None) -> dict:
    rows, total = collectives(calls)
    formula = megatron_bytes(cfg, tp, batch * seq_len, dtype.itemsize)
    case = {"config": name, "route": route, "dims": vars(cfg) | {"ffn_hidden_dim": cfg.ffn_hidden_dim}, "tp": tp,
            "sequence_parallel": sp, "loss_parallel": True, "activation_dtype": str(dtype)[6:],
            "micro_batch_size": batch, "seq_len": seq_len, "tokens_per_micro_batch": batch * seq_len,
            "collectives": rows, "counted_bytes_per_rank": total, "megatron_bytes_per_rank": formula,
            "ratio": total / formula, "partial_grads": partial}
    if step_calls is not None:
        step_rows, step_total = collectives(step_calls)
        case["per_step"] = {"what": "reduce_partial_grads + clip_grad_norm + Optimizers.step, once per step after its micro-steps",
                            "collectives": step_rows, "bytes_per_rank": step_total,
                            "one_all_reduce_per_partial_grad_bytes": 2 * (tp - 1) / tp * partial["bytes"]}
    return case


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/tp_comm.json")
    args = p.parse_args()
    tiny = load_config(TINY, [])
    cfg, batch, seq_len, fp32 = tiny.model_config(), tiny.train.micro_batch_size, tiny.train.seq_len, torch.float32
    cases = []
    for tp in (2, 4):
        real = gloo_world(tp, steps, [(cfg, sp, batch, seq_len) for sp in (False, True)], tiny.train)
        for sp, (calls, partial, step_calls) in zip((False, True), real):
            fake = fake_world(cfg, tp, sp, batch, seq_len, fp32)
            assert fake == (calls, partial), f"the fake route disagrees with gloo at tp={tp} sp={sp}: {fake}"
            cases.append(report("tiny", cfg, tp, sp, batch, seq_len, fp32, "gloo world; fake PG agrees",
                                calls, partial, step_calls))
    for tp in (2, 8):
        for sp in (False, True):
            calls, partial = fake_world(ONE_B, tp, sp, ONE_B_BATCH, ONE_B_SEQ, torch.bfloat16)
            cases.append(report("1b", ONE_B, tp, sp, ONE_B_BATCH, ONE_B_SEQ, torch.bfloat16,
                                "fake PG + FakeTensor, all layers", calls, partial))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "tp_comm", "torch": torch.__version__, "cases": cases}, indent=2) + "\n")
    print(f"{'config':6} {'tp':>2} {'sp':>5} {'tokens':>6} {'counted MiB':>11} {'Megatron MiB':>12} {'ratio':>6} "
          f"{'clip+opt KiB':>12}  collectives per micro-step (f forward, b backward)")
    for c in cases:
        ops = Counter()
        for x in c["collectives"]:
            ops[x["phase"][0], x["op"]] += x["count"]
        step = f"{c['per_step']['bytes_per_rank'] / 2**10:12.1f}" if "per_step" in c else f"{'-':>12}"
        print(f"{c['config']:6} {c['tp']:>2} {str(c['sequence_parallel']):>5} {c['tokens_per_micro_batch']:>6} "
              f"{c['counted_bytes_per_rank'] / 2**20:>11.2f} {c['megatron_bytes_per_rank'] / 2**20:>12.2f} "
              f"{c['ratio']:>6.3f} {step}  " + ", ".join(f"{p} {op} x{n}" for (p, op), n in sorted(ops.items())))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
