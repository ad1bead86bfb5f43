"""Expert tensor parallelism (ETP), measured: expert weight bytes per rank at tp = 1, 2, 4 (with and without
ep) and the bytes one MoE layer moves per micro-step; JSON to benchmarks/results/expert_memory.json.

1. Memory. The family's model on the meta device, sharded as the trainer shards it (its ParallelPlan through
   `parallelize`, FSDP included where the layout has dp_shard > 1), as rank 0 of a fake process group of
   tp x ep processes (dp_shard = ep: the experts borrow those ranks): the bytes of every parameter shard this
   rank holds, routed experts apart from the rest. Model states under fp32 AdamW are 4x that (weights,
   gradients, two moments). Before ETP every tp rank held the whole experts: tp=1's expert bytes at the same ep.
2. Communication. One MoE layer of the tiny config (fp32, all its 8 x 128 tokens per dp rank, forward +
   backward) split as a run splits it (moe_plan + apply_experts), run in real gloo worlds; every collective
   counted below DTensor (benchmarks/tp_comm.py's counter), bytes per rank as ring traffic. Megatron's
   count for the tp part with A = tokens x dim x bytes and f = (tp-1)/tp: 4 f A per layer (SP: all-gather
   and reduce-scatter forward, the same pair backward; without SP two all-reduces of 2 f A), plus this
   design's all-reduce of the route weights' gradient (k fp32 numbers per token), 2 f k tokens 4 bytes. The
   experts kept whole cost 2 f A under SP (the input all-gather forward, the output gradient's all-gather
   backward) and nothing without SP. ep adds the row all-to-alls, 4 k tokens (ep-1)/ep dim bytes (out and back,
   forward and backward; moe_dispatch.py), where tokens are all the tokens of the tp group: under EP x ETP
   every tp rank dispatches the same rows as its tp peers. The per-expert counts' all-to-all (E integers) and
   the routing statistics' all-reduce over the batch group (2E+3 numbers) are small.

    .venv/bin/python benchmarks/expert_memory.py [--out benchmarks/results/expert_memory.json]
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tp_comm import CollectiveCounter, collectives, fake_group, gloo_world  # noqa: E402
from launcher.config import load_config  # noqa: E402
from models import get_model_spec  # noqa: E402
from models.moe.model import MoE  # noqa: E402
from models.moe.parallelize import apply_experts, moe_plan  # noqa: E402
from parallel.mesh import ParallelDims  # noqa: E402
from parallel.options import ParallelizeOptions  # noqa: E402
from parallel.parallelize import parallelize  # noqa: E402

CONFIGS = {"tiny": "configs/moe/tiny.yaml", "8x1b": "configs/moe/8x1b.yaml"}
MEMORY_LAYOUTS = [(tp, ep) for ep in (1, 2) for tp in (1, 2, 4)]  # (tp, ep)
COMM_LAYOUTS = [(2, 1, 2), (4, 1, 4), (2, 2, 4), (1, 2, 2)]  # (tp, ep, world)


def local_bytes(param: torch.Tensor) -> int:
    local = param.to_local() if isinstance(param, DTensor) else param
    return local.numel() * local.element_size()


def memory_case(name: str, cfg, tp: int, ep: int) -> dict:
    """Parameter bytes on rank 0 of a fake tp x ep world, routed experts apart."""
    spec = get_model_spec("moe")
    dims = ParallelDims.resolve(tp=tp, ep=ep, dp_shard=ep, world_size=tp * ep)
    with fake_group(tp * ep):
        meshes = dims.build_mesh("cpu")
        with torch.device("meta"):
            model = spec.model_cls(cfg)
        parallelize(model, spec.plan, dims, meshes, ParallelizeOptions())
        expert = sum(local_bytes(p) for n, p in model.named_parameters() if ".experts." in n and ".shared" not in n)
        total = sum(local_bytes(p) for p in model.parameters())
    return {"config": name, "tp": tp, "ep": ep, "dp_shard": ep, "world": tp * ep, "routed_expert_param_bytes": expert,
            "total_param_bytes": total, "routed_expert_model_state_bytes": 4 * expert,
            "total_model_state_bytes": 4 * total}


def layer_traffic(world: int, cases: list) -> list:
    """On every rank of a gloo world: each case's collectives of one MoE layer's forward + backward, and its
    expert bytes on this rank."""
    results = []
    for cfg, tp, ep, sp, batch, seq_len in cases:
        dims = ParallelDims.resolve(tp=tp, ep=ep, dp_shard=world // tp, world_size=world)
        meshes = dims.build_mesh("cpu")
        torch.manual_seed(0)
        layer = MoE(cfg)
        if tp > 1:
            parallelize_module(layer, meshes.tp, moe_plan(layer, sp))
        apply_experts(layer, dims, meshes)
        generator = torch.Generator().manual_seed(meshes.batch.get_local_rank())  # tokens per dp rank
        x = torch.randn(batch, seq_len, cfg.dim, generator=generator)
        if tp > 1 and sp:
            x = x.chunk(tp, dim=1)[meshes.tp.get_local_rank()]
        x = x.clone().requires_grad_()  # as inside a model: the input's gradient is reduced too
        with CollectiveCounter("forward") as counter:
            (layer(x) * x).sum().backward()
        results.append((counter.calls, sum(local_bytes(p) for p in layer.experts.parameters())))
    return results


def comm_case(cfg, tp: int, ep: int, world: int, sp: bool, batch: int, seq_len: int, calls: Counter,
              expert_bytes: int) -> dict:
    rows, total = collectives(calls)
    f, tokens = (tp - 1) / tp, batch * seq_len
    activation = tokens * cfg.dim * 4
    etp = 4 * f * activation + 2 * f * cfg.top_k * tokens * 4 if tp > 1 else 0.0
    # Rows out and back in the forward, their gradients in the backward: every routed row of the tp group's tokens.
    all_to_all = 4 * cfg.top_k * tokens * (ep - 1) / ep * cfg.dim * 4
    by_op = Counter()
    for row in rows:
        by_op[f"{row['phase']} {row['op']} over {row['group']}"] += row["bytes_per_rank"]
    return {"config": "tiny", "tp": tp, "ep": ep, "dp_shard": world // tp, "world": world, "sequence_parallel": sp,
            "tokens_per_dp_rank": tokens, "collectives": rows, "bytes_per_rank_by_op": dict(by_op),
            "counted_bytes_per_rank": total, "tp_formula_bytes_per_rank": etp,
            "ep_all_to_all_formula_bytes_per_rank": all_to_all,
            "whole_experts_tp_bytes_per_rank": 2 * f * activation if sp else 0.0,
            "routed_expert_param_bytes_on_rank0": expert_bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/expert_memory.json")
    args = p.parse_args()
    configs = {name: load_config(Path(path), []) for name, path in CONFIGS.items()}
    memory = [memory_case(name, c.model_config(), tp, ep) for name, c in configs.items() for tp, ep in MEMORY_LAYOUTS]
    tiny = configs["tiny"]
    cfg, batch, seq_len = tiny.model_config(), tiny.train.micro_batch_size, tiny.train.seq_len
    comm = []
    for tp, ep, world in COMM_LAYOUTS:
        sps = (True, False) if tp > 1 else (True,)
        measured = gloo_world(world, layer_traffic, [(cfg, tp, ep, sp, batch, seq_len) for sp in sps])
        comm += [comm_case(cfg, tp, ep, world, sp, batch, seq_len, calls, experts)
                 for sp, (calls, experts) in zip(sps, measured)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "expert_memory", "torch": torch.__version__, "memory": memory,
                               "communication_per_moe_layer_per_micro_step": comm}, indent=2) + "\n")
    print(f"{'config':6} {'tp':>2} {'ep':>2} {'expert MiB/rank':>15} {'x tp=1':>7} {'total MiB/rank':>14}")
    for m in memory:
        base = next(b for b in memory if b["config"] == m["config"] and b["ep"] == m["ep"] and b["tp"] == 1)
        print(f"{m['config']:6} {m['tp']:>2} {m['ep']:>2} {m['routed_expert_param_bytes'] / 2**20:>15.2f} "
              f"{m['routed_expert_param_bytes'] / base['routed_expert_param_bytes']:>7.3f} "
              f"{m['total_param_bytes'] / 2**20:>14.2f}")
    print(f"\n{'tp':>2} {'ep':>2} {'sp':>5} {'counted KiB':>11} {'tp formula KiB':>14} {'a2a formula KiB':>15} "
          f"{'whole experts KiB':>17}  by op")
    for c in comm:
        ops = ", ".join(f"{op} {b / 2**10:.1f}" for op, b in sorted(c["bytes_per_rank_by_op"].items()))
        print(f"{c['tp']:>2} {c['ep']:>2} {str(c['sequence_parallel']):>5} "
              f"{c['counted_bytes_per_rank'] / 2**10:>11.1f} "
              f"{c['tp_formula_bytes_per_rank'] / 2**10:>14.1f} "
              f"{c['ep_all_to_all_formula_bytes_per_rank'] / 2**10:>15.1f} "
              f"{c['whole_experts_tp_bytes_per_rank'] / 2**10:>17.1f}  "
              f"{ops}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
