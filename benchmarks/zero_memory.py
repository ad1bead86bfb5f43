"""Model-state bytes per rank under DeepSpeed's ZeRO stages 1/2/3 (and with offload) next to FSDP2's, as JSON.

Counted from the tensors each rank holds, not RSS: every live tensor reachable by Python's garbage collector,
each storage once, at the end of the second step's backward (parameters, gradients and the optimizer states of
the first step all alive; activations freed) minus the same count taken before the model was built. The total is
split into
- parameters: the storages of the module's parameters as this rank holds them (FSDP2: its DTensor shard; ZeRO-3:
  the parameter's partition, ds_tensor),
- optimizer: the client AdamW's tensors (its parameters, which under ZeRO are the fp32 master partitions, and its
  exp_avg / exp_avg_sq / step) not already counted as parameters,
- grad: the module parameters' .grad as this rank holds them (FSDP2: the sharded gradient; ZeRO-1: the whole
  gradient; ZeRO-2/3 keep theirs elsewhere: in rest),
- rest: everything else the engine holds: ZeRO's gradient partitions and flat buffers, communication buckets.
On a CPU-only machine offload has no separate device memory to save: the JSON records where the bytes are, and
they are all in CPU memory. fp32, the tiny LLM of the tests (vocab 1024, seq_len 64, global batch 8 sequences),
one step's batch split over the dp ranks, torch's AdamW on both engines.

    DS_ACCELERATOR=cpu .venv-extras/bin/python benchmarks/zero_memory.py [--dp 1 2 4] [--out FILE]
"""
import argparse
import gc
import json
import os
import socket
import sys
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# DeepSpeed's buckets default to 5e8 elements (ZeRO-3 allocates one: 1.9 GiB per rank in fp32, the case
# zero3_default_buckets); sized to the tiny model here (256 Ki elements, 1 MiB) so the counts show the model states.
BUCKETS = ("parallel.deepspeed={zero_optimization: {reduce_bucket_size: 262144, allgather_bucket_size: 262144, "
           "stage3_prefetch_bucket_size: 262144}}")


def zero(stage: int, *more: str) -> list[str]:
    return ["parallel.engine=deepspeed", f"parallel.zero_stage={stage}", *more]


# name -> overrides of the tiny config
CASES = {"fsdp2": [], "zero1": zero(1, BUCKETS), "zero2": zero(2, BUCKETS), "zero3": zero(3, BUCKETS),
         "zero2_offload_optimizer": zero(2, BUCKETS, "parallel.offload_optimizer=true"),
         "zero3_offload_optimizer_params": zero(3, BUCKETS, "parallel.offload_optimizer=true",
                                                "parallel.offload_params=true"),
         "zero3_default_buckets": zero(3)}
VOCAB, SEQ, BATCH = 1024, 64, 8


def live_storages() -> dict[int, tuple[int, str, torch.UntypedStorage]]:
    """data_ptr -> (bytes, device, the storage) of every storage a Python-reachable tensor uses (parameters
    included). Holding the storage keeps its address from being reused by a later allocation."""
    found = {}
    with warnings.catch_warnings():  # isinstance on some library objects warns (deprecated proxies)
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if not obj.is_meta:
            tensor = obj._local_tensor if isinstance(obj, DTensor) else obj
            storage = tensor.untyped_storage()
            if storage.nbytes():
                found[storage.data_ptr()] = (storage.nbytes(), str(tensor.device), storage)
    return found


def storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        t = t._local_tensor if isinstance(t, DTensor) else t
        if t.untyped_storage().nbytes():
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def measure(name: str, overrides: list[str], world: int) -> dict:
    from launcher.config import load_config, validate
    from launcher.deepspeed_engine import ZeroOptimizers, deepspeed_config
    from launcher.optim import Optimizers
    from models import get_model_spec
    from parallel.init import materialize
    from parallel.parallelize import parallelize

    cfg = load_config(REPO / "configs" / "llm" / "tiny.yaml",
                      [f"data.vocab_size={VOCAB}", f"train.seq_len={SEQ}", f"train.global_batch_size={BATCH}",
                       f"train.micro_batch_size={BATCH // world}", *overrides])
    dims = validate(cfg, world)
    meshes = dims.build_mesh("cpu")
    spec = get_model_spec("llm")
    gc.collect()
    before = live_storages()
    with torch.device("meta"):
        model = spec.model_cls(cfg.model_config())
    if cfg.parallel.engine == "torch":
        model = parallelize(model, spec.plan, dims, meshes, cfg.parallelize_options())
        materialize(model, "cpu", 0)
        optimizers = Optimizers([model], cfg.train)
        part, client = model, optimizers.optimizers[0]
    else:
        materialize(model, "cpu", 0)
        optimizers = ZeroOptimizers(model, cfg.train, deepspeed_config(cfg, dims, bf16=False))
        part, client = optimizers.engine, optimizers.schedule_state.optimizer
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    for step in range(2):
        tokens = torch.randint(0, VOCAB, (BATCH // world, SEQ + 1), generator=generator)
        logits = part(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizers.backward(loss)
        del logits, loss
        if step == 1:
            # A .grad that autograd set has no Python object until it is read: read, the walk finds it.
            grad_tensors = [p.grad for p in model.parameters() if p.grad is not None]
            gc.collect()
            held = {ptr: v for ptr, v in live_storages().items() if ptr not in before}
            grads = storages(grad_tensors)
            del grad_tensors
        optimizers.clip_grad_norm(part.parameters(), 1.0, meshes.pp.get_group())
        optimizers.step()
    params = storages(getattr(p, "ds_tensor", p) for p in model.parameters())
    optimizer = storages([p for group in client.param_groups for p in group["params"]]
                         + [v for state in client.state.values() for v in state.values() if torch.is_tensor(v)])
    optimizer = {ptr: n for ptr, n in optimizer.items() if ptr not in params}
    total = sum(n for n, _, _ in held.values())
    in_params = sum(n for ptr, n in params.items() if ptr in held)
    in_optimizer = sum(n for ptr, n in optimizer.items() if ptr in held)
    in_grads = sum(n for ptr, n in grads.items() if ptr in held and ptr not in params and ptr not in optimizer)
    by_device: dict[str, int] = {}
    for n, device, _ in held.values():
        by_device[device] = by_device.get(device, 0) + n
    return {"case": name, "dp": world, "total_bytes": total, "parameter_bytes": in_params,
            "optimizer_bytes": in_optimizer, "grad_bytes": in_grads,
            "rest_bytes": total - in_params - in_optimizer - in_grads, "by_device": by_device,
            "n_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    results = [measure(name, overrides, world) for name, overrides in CASES.items()]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "zero_memory.json"))
    args = parser.parse_args()
    rows = []
    for world in args.dp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tmp = Path(args.out).with_suffix(f".dp{world}.tmp")
        mp.spawn(rank_main, args=(world, port, str(tmp)), nprocs=world)
        per_rank = json.loads(tmp.read_text())
        tmp.unlink()
        for case in range(len(CASES)):
            ranks = [results[case] for results in per_rank]
            row = {k: v for k, v in ranks[0].items() if not k.endswith("_bytes") and k != "by_device"}
            for key in ("total_bytes", "parameter_bytes", "optimizer_bytes", "grad_bytes", "rest_bytes"):
                row[f"max_{key}"] = max(r[key] for r in ranks)  # per rank: the largest rank's
            row["by_device_rank0"] = ranks[0]["by_device"]
            rows.append(row)
            print(f"dp={world} {row['case']:32s} total {row['max_total_bytes'] / 2**20:7.2f} MiB  parameters "
                  f"{row['max_parameter_bytes'] / 2**20:6.2f}  optimizer {row['max_optimizer_bytes'] / 2**20:6.2f}  "
                  f".grad {row['max_grad_bytes'] / 2**20:6.2f}  rest {row['max_rest_bytes'] / 2**20:7.2f}", flush=True)
    Path(args.out).write_text(json.dumps({"what": __doc__.split("\n\n")[0], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
