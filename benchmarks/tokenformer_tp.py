"""TokenFormer tensor parallelism: the Q/K/V Pattentions split by parameter tokens or with replicated
keys and head-sharded values (`model.qkv_tensor_parallel`), measured; JSON to
benchmarks/results/tokenformer_tp.json.

- `tokens` (ParameterTokenParallel): every rank holds n/t key and value tokens; the norm's sum of
  squares [B,S,1] is all-reduced and the partial outputs are reduce-scattered on the feature axis to
  the rank's heads. All Q/K/V FLOPs divide by t.
- `heads` (HeadShardedValues): all n key tokens on every rank, value tokens split by output features;
  no forward communication, but every rank computes all n scores (and their backward).
wo and the FFN are split by tokens in both modes.

For both modes, tp=2 and 4, with and without sequence parallelism, one micro-step as the trainer runs
it (forward, loss sum under loss_parallel, backward) on a model sharded by the family's plan through
`parallelize`, counts (benchmarks/tp_comm.py's machinery):
- communication: ring bytes per rank of every collective, forward and backward, by the kind of module
  that issued it: embedding, qkv (wq/wk/wv and the gather of their input), attention (core), wo, ffn,
  norm, head, loss (loss_parallel's cross entropy). A collective in forward is the kind on top of a
  stack kept by hooks outside the parallel styles' own; in backward, the kind whose forward created
  the running autograd node (each module tags the nodes it created when it returns).
- compute: FLOPs per rank (FlopCounterMode on the local ops DTensor runs, plus CPU flash attention,
  which it does not know), by the same kinds, next to the unsharded model's FLOPs / t. SDPA counts a
  causal attention as a full square, as FlopCounterMode does for every SDPA kernel.
- parameters per rank (elements, by kind).
Configs: tiny (configs/tokenformer/tiny.yaml, fp32) in real gloo worlds, which must count exactly what
the fake route counts, and which also time the micro-step (median of a few, one thread per rank, on
whatever CPU cores this machine has: not representative of NVLink); 450m (the paper's: d=1024, 24
layers, 16 heads, 1024 qkv/proj tokens, 4096 FFN tokens, GPT-NeoX vocabulary padded to 50304,
1 x 2048 tokens, bf16) through a fake process group and FakeTensors.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tokenformer_tp.py [--out ...] [--repeats 5]
"""
import argparse
import dataclasses
import json
import os
import re
import statistics
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor
from torch.utils import flop_counter
from torch.utils._pytree import tree_leaves

from benchmarks.tp_comm import (CollectiveCounter, collectives, fake_group, forward_backward, gloo_world,
                                random_batch, sharded_model)
from launcher.config import load_config
from models.tokenformer import TokenFormer, TokenFormerConfig, flops_per_token
from parallel.init import init_parameters

TINY = "configs/tokenformer/tiny.yaml"
PAPER_450M = TokenFormerConfig(dim=1024, n_layers=24, n_heads=16, vocab_size=50304, qkv_tokens=1024,
                               proj_tokens=1024, ffn_tokens=4096)
BATCH_450M, SEQ_450M = 1, 2048
MODES, TPS, SPS = ("tokens", "heads"), (2, 4), (False, True)
# module name -> (its kind, the kind of its input hooks): the attention's input gather feeds wq/wk/wv.
KINDS = ((r"tok_embeddings$", "embedding", "embedding"), (r"attention\.w[qkv]$", "qkv", "qkv"),
         (r"attention\.wo$", "wo", "wo"), (r"attention$", "attention", "qkv"),
         (r"attention\.core_attention$", "attention", "attention"), (r"feed_forward$", "ffn", "ffn"),
         (r"norm$", "norm", "norm"), (r"output$", "head", "head"))
# CPU SDPA kernels, which FlopCounterMode's registry lacks; same operands as the CUDA ones'.
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop.__wrapped__,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop.__wrapped__}


class Kinds:
    """(phase, kind) of the module running now, forward or backward; "loss" outside every kind."""

    def __init__(self, model: torch.nn.Module):
        self.stack, self.handles = [], []
        for name, module in model.named_modules():
            match = next((k for k in KINDS if re.search(k[0], name)), None)
            if match is None:
                continue
            _, kind, input_kind = match
            # Around the parallel styles' hooks: before their input hooks, after their output hooks.
            self.handles.append(module.register_forward_pre_hook(partial(self._enter, input_kind), prepend=True))
            if input_kind != kind:
                self.handles.append(module.register_forward_pre_hook(partial(self._inside, kind)))
            self.handles.append(module.register_forward_hook(self._exit))

    def _enter(self, kind, _module, _args):
        self.stack.append(kind)

    def _inside(self, kind, _module, _args):
        self.stack[-1] = kind

    def _exit(self, _module, _args, output):
        kind, nodes = self.stack.pop(), [t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
        while nodes:  # tag the autograd nodes this module created (inner modules tagged theirs already)
            node = nodes.pop()
            if node is not None and "kind" not in node.metadata:
                node.metadata["kind"] = kind
                nodes += [next_node for next_node, _ in node.next_functions]

    def __call__(self) -> tuple[str, str]:
        node = torch._C._current_autograd_node()
        if node is not None:
            return "backward", node.metadata.get("kind", "loss")
        return "forward", self.stack[-1] if self.stack else "loss"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class KindCollectives(CollectiveCounter):
    """tp_comm's collective counter, with the kind of module in place of the module name."""

    def __init__(self, kinds: Kinds):
        super().__init__("forward")
        self.kinds = kinds

    def where(self) -> tuple[str, str]:
        return self.kinds()


class _LocalOps(flop_counter._FlopCounterMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # count the local ops DTensor runs on this rank, not the global op
        return super().__torch_dispatch__(func, types, args, kwargs)


class RankFlops(flop_counter.FlopCounterMode):
    """FLOPs this rank computes, by (phase, kind)."""

    def __init__(self, kinds: Kinds):
        super().__init__(display=False, custom_mapping=CPU_ATTENTION)
        self.kinds, self.by_kind = kinds, Counter()

    def __enter__(self):  # FlopCounterMode's, with the mode that lets DTensor go first
        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        self.mode = _LocalOps(self)
        self.mode.__enter__()
        return self

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            self.by_kind[self.kinds()] += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
        return super()._count_flops(func_packet, out, args, kwargs)


def parameters_by_kind(model: torch.nn.Module) -> Counter:
    """Parameter elements this rank holds, by kind (a tied weight once, under its first owner)."""
    counts, seen = Counter(), set()
    for name, module in model.named_modules():
        kind = next((k[1] for k in KINDS if re.search(k[0], name)), None)
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                counts[kind] += (param.to_local() if isinstance(param, DTensor) else param).numel()
    return counts


def measure(model, cfg: TokenFormerConfig, batch: int, seq_len: int, warm_up=None) -> dict:
    """Collectives, FLOPs (both by (phase, kind)) and parameters of one micro-step on this rank, after
    an uncounted one of `warm_up` (default: the model): the first time DTensor sees an op on given
    shapes and placements, it runs the op once more on global shapes to propagate its sharding."""
    torch.manual_seed(0)  # the same batch on every tp rank
    batch_ = random_batch(cfg, batch, seq_len)
    forward_backward(model if warm_up is None else warm_up, *batch_)
    kinds = Kinds(model)
    with KindCollectives(kinds) as calls, RankFlops(kinds) as flops:
        forward_backward(model, *batch_)
    kinds.remove()
    assert flops.get_total_flops() == sum(flops.by_kind.values())
    return {"calls": calls.calls, "flops": flops.by_kind, "parameters": parameters_by_kind(model)}


def time_micro_steps(model, cfg: TokenFormerConfig, batch: int, seq_len: int, repeats: int) -> list[float]:
    """Seconds of `repeats` micro-steps after one warm-up, the tp ranks lined up by a barrier before each."""
    torch.manual_seed(0)
    tokens, targets = random_batch(cfg, batch, seq_len)
    times = []
    for _ in range(repeats + 1):
        for p in model.parameters():
            p.grad = None
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        forward_backward(model, tokens, targets)
        times.append(time.perf_counter() - start)
    return times[1:]


def gloo_cases(tp: int, cfg: TokenFormerConfig, batch: int, seq_len: int, repeats: int) -> list[dict]:
    """Every (mode, sp) case, measured and timed on this rank of a gloo world."""
    results = []
    for mode in MODES:
        for sp in SPS:
            model, _ = sharded_model(dataclasses.replace(cfg, qkv_tensor_parallel=mode), tp, sp, torch.float32,
                                     "tokenformer")
            model.to_empty(device="cpu")
            init_parameters(model, seed=0)
            results.append(measure(model, cfg, batch, seq_len) | {"times": time_micro_steps(model, cfg, batch, seq_len,
                                                                                             repeats)})
    return results


def fake_case(cfg: TokenFormerConfig, mode: str, tp: int, sp: bool, batch: int, seq_len: int, dtype) -> dict:
    cfg = dataclasses.replace(cfg, qkv_tensor_parallel=mode)
    with fake_group(tp):
        model, _ = sharded_model(cfg, tp, sp, dtype, "tokenformer")
        # One layer has every shape the model has: it warms DTensor's caches at 1 / n_layers of the cost.
        warm_up, _ = sharded_model(dataclasses.replace(cfg, n_layers=1), tp, sp, dtype, "tokenformer")
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            warm_up.to_empty(device="cpu")
            return measure(model, cfg, batch, seq_len, warm_up)


def unsharded(cfg: TokenFormerConfig, batch: int, seq_len: int, dtype) -> dict:
    with torch.device("meta"):
        model = TokenFormer(cfg).to(dtype)
    parameters = parameters_by_kind(model)  # counted before to_empty, which unties a tied weight of a plain model
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        return measure(model, cfg, batch, seq_len) | {"parameters": parameters}


def by_phase(counts: dict) -> dict:
    """{phase: {kind: value, ..., "total": value}} from {(phase, kind): value}."""
    out = {}
    for (phase, kind), value in sorted(counts.items()):
        out.setdefault(phase, {})[kind] = value
    for phase in out.values():
        phase["total"] = sum(phase.values())
    return out


def report(name: str, cfg: TokenFormerConfig, mode: str, tp: int, sp: bool, batch: int, seq_len: int, dtype,
           route: str, result: dict, reference: dict) -> dict:
    rows, total = collectives(result["calls"])
    bytes_ = Counter()
    for row in rows:
        bytes_[row["phase"], row["module"]] += row["bytes_per_rank"]
    calls = Counter()
    for row in rows:
        calls[row["phase"]] += row["count"]
    flops, flops_1 = sum(result["flops"].values()), sum(reference["flops"].values())
    case = {"config": name, "route": route, "qkv_tensor_parallel": mode, "tp": tp, "sequence_parallel": sp,
            "activation_dtype": str(dtype)[6:], "micro_batch_size": batch, "seq_len": seq_len,
            "bytes_per_rank": by_phase(bytes_) | {"total": total}, "collective_calls": dict(calls),
            "flops_per_rank": by_phase(result["flops"]) | {"total": flops},
            "unsharded_flops_over_tp": flops_1 / tp, "flops_over_unsharded_over_tp": flops * tp / flops_1,
            "parameters_per_rank": dict(result["parameters"]) | {"total": sum(result["parameters"].values())},
            "collectives": rows}
    if "times" in result:
        case["wall_s"] = {"median": statistics.median(result["times"]), "all": result["times"]}
    return case


def compare(cases: list[dict], cfg_of: dict) -> list[dict]:
    """tokens vs heads at each (config, tp, sp): what heads saves in bytes, what it costs in FLOPs."""
    out = []
    for c in cases:
        if c["qkv_tensor_parallel"] != "tokens":
            continue
        h = next(x for x in cases if x["qkv_tensor_parallel"] == "heads" and
                 all(x[k] == c[k] for k in ("config", "tp", "sequence_parallel")))
        cfg, t = cfg_of[c["config"]], c["tp"]
        saved = c["bytes_per_rank"]["total"] - h["bytes_per_rank"]["total"]
        extra = h["flops_per_rank"]["total"] - c["flops_per_rank"]["total"]
        # heads computes all n_qkv scores per rank: forward x K^T and backward dx, dK, 3 Pattentions a layer
        formula = 18 * c["micro_batch_size"] * c["seq_len"] * cfg.dim * cfg.qkv_tokens * cfg.n_layers * (1 - 1 / t)
        row = {"config": c["config"], "tp": t, "sequence_parallel": c["sequence_parallel"],
               "bytes_per_rank": {"tokens": c["bytes_per_rank"]["total"], "heads": h["bytes_per_rank"]["total"]},
               "forward_bytes_per_rank": {"tokens": c["bytes_per_rank"]["forward"]["total"],
                                          "heads": h["bytes_per_rank"]["forward"]["total"]},
               "collective_calls": {"tokens": c["collective_calls"], "heads": h["collective_calls"]},
               "flops_per_rank": {"tokens": c["flops_per_rank"]["total"], "heads": h["flops_per_rank"]["total"]},
               "unsharded_flops_over_tp": c["unsharded_flops_over_tp"],
               "parameters_per_rank": {"tokens": c["parameters_per_rank"]["total"],
                                       "heads": h["parameters_per_rank"]["total"]},
               "heads_saves_bytes": saved, "heads_extra_flops": extra, "heads_extra_flops_formula": formula,
               # heads is faster iff the device's FLOP/s over the link's bytes/s exceeds this
               "break_even_flops_per_byte": extra / saved if saved > 0 else None}
        if "wall_s" in c:
            row["wall_s_median"] = {"tokens": c["wall_s"]["median"], "heads": h["wall_s"]["median"]}
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/tokenformer_tp.json")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    started = time.perf_counter()
    tiny = load_config(TINY, [])
    shapes = {"tiny": (tiny.model_config(), tiny.train.micro_batch_size, tiny.train.seq_len, torch.float32),
              "450m": (PAPER_450M, BATCH_450M, SEQ_450M, torch.bfloat16)}
    cases, references, runs = [], {}, {}
    for name, (cfg, batch, seq_len, dtype) in shapes.items():
        references[name] = unsharded(cfg, batch, seq_len, dtype)
        runs[name] = {"dims": dataclasses.asdict(cfg), "flops": sum(references[name]["flops"].values()),
                      "flops_causal_formula": flops_per_token(cfg, seq_len) * batch * seq_len,
                      "parameters": sum(references[name]["parameters"].values())}
    cfg, batch, seq_len, dtype = shapes["tiny"]
    torch.set_num_threads(1)
    model = TokenFormer(cfg)
    init_parameters(model, seed=0)
    runs["tiny"]["wall_s"] = statistics.median(time_micro_steps(model, cfg, batch, seq_len, args.repeats))
    for tp in TPS:
        real = gloo_world(tp, gloo_cases, cfg, batch, seq_len, args.repeats)
        for (mode, sp), result in zip([(m, s) for m in MODES for s in SPS], real):
            fake = fake_case(cfg, mode, tp, sp, batch, seq_len, dtype)
            assert all(fake[k] == result[k] for k in fake), f"fake route disagrees with gloo: {mode} tp={tp} sp={sp}"
            cases.append(report("tiny", cfg, mode, tp, sp, batch, seq_len, dtype, "gloo world; fake PG agrees",
                                result, references["tiny"]))
    cfg, batch, seq_len, dtype = shapes["450m"]
    for mode in MODES:
        for tp in TPS:
            for sp in SPS:
                result = fake_case(cfg, mode, tp, sp, batch, seq_len, dtype)
                cases.append(report("450m", cfg, mode, tp, sp, batch, seq_len, dtype,
                                    "fake PG + FakeTensor, all layers", result, references["450m"]))
    comparison = compare(cases, {name: shape[0] for name, shape in shapes.items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "tokenformer_tp", "torch": torch.__version__, "cpu_cores": os.cpu_count(),
                               "threads_per_rank": 1, "seconds": time.perf_counter() - started,
                               "unsharded": runs, "comparison": comparison, "cases": cases}, indent=2) + "\n")
    print(f"{'config':6} {'tp':>2} {'sp':>5}  MiB/rank: {'tokens':>8} {'heads':>8} (forward {'tokens':>7} {'heads':>7})"
          f"  calls: {'tokens':>6} {'heads':>5}  GFLOP/rank: {'tokens':>8} {'heads':>8} {'1/tp':>8}"
          f"  {'break-even FLOP/B':>17}  wall ms: {'tokens':>6} {'heads':>6}")
    for r in comparison:
        mib = {mode: r["bytes_per_rank"][mode] / 2**20 for mode in MODES}
        forward = {mode: r["forward_bytes_per_rank"][mode] / 2**20 for mode in MODES}
        calls = {mode: sum(r["collective_calls"][mode].values()) for mode in MODES}
        gflop = {mode: r["flops_per_rank"][mode] / 1e9 for mode in MODES}
        wall = {mode: f"{r['wall_s_median'][mode] * 1e3:6.0f}" if "wall_s_median" in r else f"{'-':>6}"
                for mode in MODES}
        print(f"{r['config']:6} {r['tp']:>2} {str(r['sequence_parallel']):>5}            {mib['tokens']:8.2f} "
              f"{mib['heads']:8.2f}          {forward['tokens']:7.2f} {forward['heads']:7.2f}          "
              f"{calls['tokens']:6} {calls['heads']:5}              {gflop['tokens']:8.1f} {gflop['heads']:8.1f} "
              f"{r['unsharded_flops_over_tp'] / 1e9:8.1f}  {r['break_even_flops_per_byte'] or float('nan'):17.0f}"
              f"           {wall['tokens']} {wall['heads']}")
    print(f"unsharded tiny micro-step: {runs['tiny']['wall_s'] * 1e3:.1f} ms; -> {out} "
          f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
