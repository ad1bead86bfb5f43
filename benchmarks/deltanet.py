"""DeltaNet on CPU: the delta rule's chunkwise speed-up, a DeltaNet block against a softmax block as
the sequence grows, and multi-query associative recall (MQAR) against plain linear attention and
softmax attention; JSON to benchmarks/results/deltanet.json.

1. ops: `delta_rule_chunked` against the token-by-token reference `delta_rule_recurrent`
   (models/deltanet/ops), forward + backward (autograd, a random output gradient) of B=1, H=4
   heads, head dim 64, fp32, L = 1024, 4096, 16384 tokens; tokens/s from the best of `repeats`
   timed calls after one untimed warm-up call at 256 tokens. The recurrence at 16k tokens takes
   tens of seconds, so it is timed once (the JSON records each case's repeats).
2. blocks: one step (forward + backward, random output gradient) of the repo's own modules at
   dim 256, 4 heads of 64: the mixer alone (`DeltaNetLayer` against the LLM's `Attention`, whose
   `CoreAttention` is torch's SDPA: the flash-attention CPU kernel for fp32) and the whole block
   (norms and SwiGLU FFN added, identical in both), L = 256 .. 16384 doubling, B=1, chunk 64.
   Weights from each family's init (parallel/init.py). Reports the first L at which DeltaNet is
   faster ("crossover"), for the layer and for the block.
3. mqar: a synthetic recall task generated here. Each sequence is N key-value pairs
   `k1 v1 ... kN vN` (distinct keys from a key vocabulary, values from a value vocabulary) followed by
   N queries: keys of the context drawn with replacement, each followed by its value; the loss and
   the accuracy are taken only where the input is a queried key and the target its value. Three
   2-layer models of width 64 train for the same steps on fresh batches (AdamW, warm-up then
   cosine, seeds fixed): DeltaNet (delta rule), the same model with `mixer_rule: linear` (plain
   linear attention S += k v^T, same L2-normalized q/k, short convs, output norm; no beta), and the
   softmax LLM (RoPE, no convs). Parameter counts are reported exactly (the recurrent models have
   the short convs, and DeltaNet beta, on top of the shared projections: ~1-2% more than softmax).
   Accuracy on a fixed held-out set of 1024 sequences.

The machine is a shared 2-core VM: timings carry tens of percent of noise (the load average is
recorded); ratios within one run are more trustworthy than absolute numbers.

    .venv/bin/python benchmarks/deltanet.py [--parts ops,blocks,mqar] [--threads 1] [--mqar-pairs 16,32]
                                            [--out benchmarks/results/deltanet.json]

About 13 minutes here: ops ~2.5 (of which ~100 s the recurrence at 16k), blocks ~1, MQAR ~10.
The width check in docs/models.md (is the softmax plateau the model or the width?) is the MQAR part at
4 pairs, 1,500 steps, lr 1e-3, once at --mqar-dim 64 and once at 128 (results/deltanet_mqar_width*.json).
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.metrics import describe_machine  # noqa: E402
from models.common.loss import cross_entropy_sum  # noqa: E402
from models.deltanet.model import DeltaNet, DeltaNetConfig  # noqa: E402
from models.deltanet.ops import delta_rule_chunked, delta_rule_recurrent  # noqa: E402
from models.llm.model import LLMConfig, Transformer  # noqa: E402
from parallel.init import init_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("ops", "blocks", "mqar")


def best_time(step, repeats: int) -> float:
    """Best wall time of `repeats` calls of step()."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------- 1. chunked vs recurrent delta rule

OPS_LENGTHS = (1024, 4096, 16384)
OPS_REPEATS = {"chunked": {1024: 5, 4096: 3, 16384: 3}, "recurrent": {1024: 3, 4096: 2, 16384: 1}}
OPS_TIMING = ("best of `repeats` timed calls after one warm-up call at 256 tokens; the recurrence takes "
              "~100 s at 16384 tokens, so it is timed once there (measured, not extrapolated)")


def delta_rule_step(fn, length: int, heads: int = 4, head_dim: int = 64, **kwargs):
    """A closure running fn forward + backward on fixed random inputs of `length` tokens."""
    g = torch.Generator().manual_seed(length)
    q = F.normalize(torch.randn(1, length, heads, head_dim, generator=g), dim=-1)
    k = F.normalize(torch.randn(1, length, heads, head_dim, generator=g), dim=-1)
    v = torch.randn(1, length, heads, head_dim, generator=g)
    beta = torch.rand(1, length, heads, generator=g)
    dout = torch.randn(1, length, heads, head_dim, generator=g)

    def step():
        inputs = [x.clone().requires_grad_() for x in (q, k, v, beta)]
        o, _ = fn(*inputs, **kwargs)
        o.backward(dout)
    return step


def bench_ops() -> list[dict]:
    backends = {"chunked": (delta_rule_chunked, {"chunk_size": 64}), "recurrent": (delta_rule_recurrent, {})}
    rows = []
    for name, (fn, kwargs) in backends.items():
        delta_rule_step(fn, 256, **kwargs)()  # warm-up: first-call allocations and dispatch caches
        for length in OPS_LENGTHS:
            repeats = OPS_REPEATS[name][length]
            seconds = best_time(delta_rule_step(fn, length, **kwargs), repeats)
            rows.append({"backend": name, "seq_len": length, "repeats": repeats, "seconds": seconds,
                         "tokens_per_s": length / seconds})
            print(f"  ops {name:9s} L={length:6d}  {seconds:8.3f} s  {length / seconds:10.0f} tok/s", flush=True)
    return rows


# ---------------------------------------------------------------- 2. DeltaNet vs softmax block

BLOCK_LENGTHS = tuple(256 * 2 ** i for i in range(7))  # 256 .. 16384


def one_block(family: str, dim: int, heads: int):
    """Layer 0 of a 1-layer model of the family, initialized as the family does it."""
    kwargs = dict(dim=dim, n_layers=1, n_heads=heads, vocab_size=2, multiple_of=64)
    model = DeltaNet(DeltaNetConfig(chunk_size=64, **kwargs)) if family == "deltanet" \
        else Transformer(LLMConfig(**kwargs))
    init_parameters(model, seed=0)
    return model.layers["0"]


def module_step(module, length: int, dim: int):
    g = torch.Generator().manual_seed(length)
    x = torch.randn(1, length, dim, generator=g)
    dout = torch.randn(1, length, dim, generator=g)

    def step():
        module.zero_grad(set_to_none=True)
        module(x.clone().requires_grad_(), None).backward(dout)
    return step


def block_repeats(length: int) -> int:
    return 3 if length <= 4096 else 2 if length <= 8192 else 1


def bench_blocks(dim: int = 256, heads: int = 4) -> dict:
    blocks = {family: one_block(family, dim, heads) for family in ("deltanet", "softmax")}
    rows = []
    for part in ("layer", "block"):
        modules = {family: block.attention if part == "layer" else block for family, block in blocks.items()}
        for module in modules.values():
            module_step(module, 256, dim)()  # warm-up
        for length in BLOCK_LENGTHS:
            repeats = block_repeats(length)
            seconds = {family: best_time(module_step(module, length, dim), repeats)
                       for family, module in modules.items()}
            rows.append({"part": part, "seq_len": length, "repeats": repeats, "deltanet_s": seconds["deltanet"],
                         "softmax_s": seconds["softmax"], "softmax_over_deltanet": seconds["softmax"] / seconds["deltanet"]})
            print(f"  {part:5s} L={length:6d}  deltanet {seconds['deltanet']:8.3f} s  softmax {seconds['softmax']:8.3f} s"
                  f"  ratio {seconds['softmax'] / seconds['deltanet']:5.2f}", flush=True)
    crossover = {part: next((r["seq_len"] for r in rows if r["part"] == part and r["softmax_over_deltanet"] > 1), None)
                 for part in ("layer", "block")}
    return {"dim": dim, "heads": heads, "head_dim": dim // heads, "batch": 1, "chunk_size": 64,
            "attention_kernel": "torch SDPA (CPU flash attention, fp32), as models/common/attention.py",
            "rows": rows, "crossover_seq_len": crossover}


# ---------------------------------------------------------------- 3. MQAR

def mqar_batch(batch: int, n_pairs: int, n_keys: int, n_values: int, generator: torch.Generator):
    """(inputs [B, 4N-1], targets [B, 4N-1], answer mask [B, 4N-1]); tokens 0..n_keys-1 are keys,
    n_keys..n_keys+n_values-1 values."""
    keys = torch.rand(batch, n_keys, generator=generator).argsort(dim=-1)[:, :n_pairs]  # distinct per row
    values = torch.randint(n_keys, n_keys + n_values, (batch, n_pairs), generator=generator)
    # Queried keys drawn with replacement: with each key queried once, the answers already given
    # would narrow the rest down (a model that only learns "a context value not yet answered"
    # scores sum_j 1/(N-j) / N, 34% at N = 8, without recalling anything).
    order = torch.randint(0, n_pairs, (batch, n_pairs), generator=generator)
    context = torch.stack([keys, values], dim=-1).flatten(1)
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=-1).flatten(1)
    sequence = torch.cat([context, queries], dim=1)
    answer = torch.zeros_like(sequence, dtype=torch.bool)
    answer[:, 2 * n_pairs + 1::2] = True  # the value after each queried key
    return sequence[:, :-1], sequence[:, 1:], answer[:, 1:]


def mqar_model(kind: str, vocab: int, dim: int, layers: int, heads: int):
    shape = dict(dim=dim, n_layers=layers, n_heads=heads, vocab_size=vocab, multiple_of=16)
    if kind == "softmax":
        return Transformer(LLMConfig(**shape))
    return DeltaNet(DeltaNetConfig(mixer_rule=kind, chunk_size=64, backend="chunked", **shape))


def recall_accuracy(model, inputs, targets, answer, batch: int = 256) -> float:
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(inputs), batch):
            predicted = model(inputs[lo:lo + batch]).argmax(-1)
            correct += ((predicted == targets[lo:lo + batch]) & answer[lo:lo + batch]).sum().item()
    return correct / answer.sum().item()


def train_mqar(kind: str, task: dict, model_shape: dict, steps: int, batch: int, lr: float, seed: int,
               held_out) -> dict:
    torch.manual_seed(seed)
    model = mqar_model(kind, task["n_keys"] + task["n_values"], **model_shape)
    init_parameters(model, seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "conv" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "conv" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup)))))
    generator = torch.Generator().manual_seed(seed + 1)
    curve, start = [], time.perf_counter()
    for step in range(steps):
        inputs, targets, answer = mqar_batch(batch, task["n_pairs"], task["n_keys"], task["n_values"], generator)
        logits = model(inputs)
        loss = F.cross_entropy(logits[answer], targets[answer])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            accuracy = recall_accuracy(model, *held_out)
            curve.append({"step": step + 1, "train_loss": loss.item(), "held_out_accuracy": accuracy})
            print(f"  mqar {kind:8s} step {step + 1:5d}  loss {loss.item():.3f}  accuracy {accuracy:.3f}", flush=True)
    with torch.no_grad():
        held_logits = model(held_out[0])
        held_targets = held_out[1][held_out[2]]
        held_loss = cross_entropy_sum(held_logits[held_out[2]], held_targets) / held_targets.numel()
    return {"model": kind, "parameters": sum(p.numel() for p in model.parameters()),
            "held_out_accuracy": curve[-1]["held_out_accuracy"], "held_out_loss": held_loss.item(),
            "train_seconds": time.perf_counter() - start, "curve": curve}


def bench_mqar(pair_counts: list[int], n_keys: int, n_values: int, dim: int, heads: int, steps: int, batch: int,
               lr: float, seed: int) -> dict:
    """Every model on every task (one task per pair count); more pairs fill the per-head states more."""
    model_shape = {"dim": dim, "layers": 2, "heads": heads}
    tasks = []
    for n_pairs in pair_counts:
        task = {"n_pairs": n_pairs, "n_keys": n_keys, "n_values": n_values, "seq_len": 4 * n_pairs - 1}
        held_out = mqar_batch(1024, n_pairs, n_keys, n_values, torch.Generator().manual_seed(seed + 1000))
        tasks.append({"task": task, "runs": [train_mqar(kind, task, model_shape, steps, batch, lr, seed, held_out)
                                             for kind in ("delta", "linear", "softmax")]})
    return {"model_shape": model_shape, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "held_out_sequences": 1024, "chance_accuracy": 1 / n_values, "tasks": tasks}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the VM has 2 shared cores)")
    parser.add_argument("--mqar-pairs", default="16,32", help="key-value pairs per sequence, one task each")
    parser.add_argument("--mqar-keys", type=int, default=128)
    parser.add_argument("--mqar-values", type=int, default=64)
    parser.add_argument("--mqar-dim", type=int, default=64, help="width of the three MQAR models")
    parser.add_argument("--mqar-heads", type=int, default=4, help="heads of the MQAR models (head dim = width / heads)")
    parser.add_argument("--mqar-steps", type=int, default=500)
    parser.add_argument("--mqar-batch", type=int, default=64)
    parser.add_argument("--mqar-lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "deltanet.json"))
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = {"machine": describe_machine()}
    if "ops" in parts:
        result["delta_rule_fwd_bwd_fp32_cpu"] = {"batch": 1, "heads": 4, "head_dim": 64, "chunk_size": 64,
                                                 "timing": OPS_TIMING, "rows": bench_ops()}
    if "blocks" in parts:
        result["block_step_fwd_bwd_fp32_cpu"] = bench_blocks()
    if "mqar" in parts:
        result["mqar"] = bench_mqar([int(n) for n in args.mqar_pairs.split(",")], args.mqar_keys, args.mqar_values,
                                    args.mqar_dim, args.mqar_heads, args.mqar_steps, args.mqar_batch, args.mqar_lr,
                                    args.seed)
    result["machine"]["load_avg_end"] = os.getloadavg()
    result["total_seconds"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)


def print_tables(result: dict) -> None:
    if "delta_rule_fwd_bwd_fp32_cpu" in result:
        rows = result["delta_rule_fwd_bwd_fp32_cpu"]["rows"]
        print("\ndelta rule fwd+bwd tokens/s (B=1, H=4, D=64, fp32)\n  L       chunked   recurrent  speed-up")
        for length in OPS_LENGTHS:
            tps = {r["backend"]: r["tokens_per_s"] for r in rows if r["seq_len"] == length}
            print(f"  {length:6d} {tps['chunked']:9.0f} {tps['recurrent']:10.0f} {tps['chunked'] / tps['recurrent']:8.1f}x")
    if "block_step_fwd_bwd_fp32_cpu" in result:
        blocks = result["block_step_fwd_bwd_fp32_cpu"]
        print("\nstep time fwd+bwd (s), dim 256, 4 heads\n  part   L       deltanet  softmax  softmax/deltanet")
        for r in blocks["rows"]:
            print(f"  {r['part']:5s} {r['seq_len']:6d} {r['deltanet_s']:9.3f} {r['softmax_s']:8.3f} "
                  f"{r['softmax_over_deltanet']:8.2f}")
        print(f"  crossover (first L where DeltaNet is faster): {blocks['crossover_seq_len']}")
    if "mqar" in result:
        mqar = result["mqar"]
        print(f"\nMQAR, {mqar['steps']} steps x {mqar['batch']}\n  pairs  seq  model     params  accuracy")
        for task in mqar["tasks"]:
            for run in task["runs"]:
                print(f"  {task['task']['n_pairs']:5d} {task['task']['seq_len']:4d}  {run['model']:8s} "
                      f"{run['parameters']:7d} {run['held_out_accuracy']:8.3f}")
    print(f"\ntotal {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
