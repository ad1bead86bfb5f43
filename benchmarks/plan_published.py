"""`shardwright plan`'s predictions for published large-scale runs, next to what was published, as JSON.

Each run is rebuilt as a config of this repository's model family that matches the published architecture
(Llama 3.1 shapes from Meta's model cards; Megatron-Core's GPT sizes approximated by the Llama-style block with
the same width, depth and parameter count) and evaluated in the published layout by the planner's own memory and
step-time model. Published MFU: the published TFLOP/s over the H100's 989 TFLOP/s bf16 peak (Megatron-Core), or
tokens/s per GPU times this repository's FLOPs per token over that peak (torchtitan, which publishes tokens/s).

How fast a stack's kernels run is not in the layout: the step-time model's one free number, the matmul efficiency,
differs between software stacks (torchtitan's eager PyTorch, Megatron-Core's fused Transformer Engine kernels).
Each run is predicted twice: with the device profile's efficiency (planner/devices.yaml), and with the efficiency
fitted on the *other* bf16 runs of the same stack (leave one out: a run never predicts itself).

    python benchmarks/plan_published.py [--out benchmarks/results/plan_published.json]
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TT = "https://github.com/pytorch/torchtitan/blob/main/benchmarks/llama3_h100_202412_torchtitan.md"
MCORE = "https://github.com/NVIDIA/Megatron-LM/blob/main/README.md (images/model_table.png)"
LLAMA3 = {"rope_theta": 500000.0, "tie_embeddings": False}
LLAMA31_8B = {**LLAMA3, "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 1024,
              "ffn_dim_multiplier": 1.3, "vocab_size": 128256}
LLAMA31_70B = {**LLAMA3, "dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096,
               "ffn_dim_multiplier": 1.3, "vocab_size": 128256}
LLAMA31_405B = {**LLAMA3, "dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "multiple_of": 4096,
                "ffn_dim_multiplier": 1.2, "vocab_size": 128256}
# Megatron-Core's GPT models: multi-head attention, a 4x MLP (as parameters: a SwiGLU of 8/3 x dim), vocab 131072.
# Its data parallelism (DDP + distributed optimizer, ZeRO-1) reduces gradients once a step: as dp_replicate here
# for step time, not dp_shard (FSDP gathers the weights again for every micro-batch). Its memory lies between the
# two: the distributed optimizer shards the optimizer states, which dp_replicate keeps whole; each run's JSON
# row gives the memory under both (memory_gib_as_fsdp: dp_shard in place of dp_replicate).
GPT_7B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "vocab_size": 131072}
GPT_70B = {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096,
           "ffn_dim_multiplier": 1.3, "vocab_size": 131072}

# name -> run: model args, layout (parallel section), train section, nodes x 8 H100, what was published.
RUNS = {
    "torchtitan Llama 3.1 8B, 8 H100, FSDP 8": dict(
        model=LLAMA31_8B, parallel={"dp_shard": 8}, nodes=1,
        train={"seq_len": 8192, "micro_batch_size": 2, "global_batch_size": 16, "activation_checkpoint": "selective"},
        tokens_per_s=5762, memory_gib=82.4, stack="torchtitan",
        source=f"{TT} Table 1 (FSDP, no compile, bf16)"),
    "torchtitan Llama 3.1 8B, 128 H100, FSDP 128": dict(
        model=LLAMA31_8B, parallel={"dp_shard": 128}, nodes=16,
        train={"seq_len": 8192, "micro_batch_size": 2, "global_batch_size": 256, "activation_checkpoint": "selective"},
        tokens_per_s=5605, memory_gib=67.0, stack="torchtitan", source=f"{TT} Table 3 (FSDP, no compile, bf16)"),
    "torchtitan Llama 3.1 70B, 256 H100, FSDP 32 TP 8": dict(
        model=LLAMA31_70B, parallel={"dp_shard": 32, "tp": 8}, nodes=32,
        train={"seq_len": 8192, "micro_batch_size": 16, "global_batch_size": 512, "activation_checkpoint": "full"},
        tokens_per_s=829, memory_gib=71.9, float8=True, stack="torchtitan", source=f"{TT} Table 4 (compile + Float8: MFU not comparable)"),
    "torchtitan Llama 3.1 405B, 512 H100, FSDP 8 TP 8 PP 8 interleaved": dict(
        model=LLAMA31_405B, nodes=64,
        parallel={"dp_shard": 8, "tp": 8, "pp": 8, "pp_schedule": "interleaved-1f1b", "pp_stages_per_rank": 2,
                  "pp_layout": "E,L7|" + "L8|" * 14 + "L7,H"},  # 126 layers over 16 stages
        train={"seq_len": 8192, "micro_batch_size": 1, "global_batch_size": 256, "activation_checkpoint": "full"},
        tokens_per_s=128, memory_gib=72.7, float8=True, stack="torchtitan", source=f"{TT} Table 5 (compile + Float8 + AsyncTP: MFU not "
                                                              f"comparable; local batch 32 split into micro-batches of 1)"),
    "Megatron-Core GPT 7.1B, TP 2, DP 48": dict(
        model=GPT_7B, parallel={"dp_replicate": 48, "dp_shard": 1, "tp": 2}, nodes=12,
        train={"seq_len": 4096, "micro_batch_size": 1, "global_batch_size": 1152, "activation_checkpoint": "none"},
        tflops=465.9, mfu=0.47, stack="megatron-core", source=f"{MCORE}; global batch assumed 1152 (not in the table)"),
    "Megatron-Core GPT 70B, TP 8 PP 2, DP 48": dict(
        model=GPT_70B, parallel={"dp_replicate": 48, "dp_shard": 1, "tp": 8, "pp": 2}, nodes=96,
        train={"seq_len": 4096, "micro_batch_size": 1, "global_batch_size": 1152, "activation_checkpoint": "none"},
        tflops=419.7, mfu=0.42, stack="megatron-core", source=f"{MCORE}; global batch assumed 1152 (not in the table)"),
}
PEAK = 989.4e12  # H100 SXM bf16 dense, as the publications divide by


def config_of(run: dict):
    from launcher.config import load_config

    model = dict(run["model"])
    overrides = ["model.family=llm", f"data.vocab_size={model.pop('vocab_size')}"]
    overrides += [f"model.{k}={v}" for k, v in model.items()]
    overrides += [f"parallel.{k}={v}" for k, v in run["parallel"].items()]
    overrides += [f"train.{k}={v}" for k, v in run["train"].items()]
    return load_config(None, overrides)


def published_mfu(cfg, run: dict) -> float:
    from models import get_model_spec

    flops = get_model_spec("llm").flops_per_token(cfg.model_config(), cfg.train.seq_len)
    return run["mfu"] if "mfu" in run else run["tokens_per_s"] * flops / PEAK


def predict(run: dict, efficiency: float | None = None):
    """(config, device, the planner's candidate) for a run; efficiency replaces the profile's if given."""
    from planner.search import evaluate
    from planner.step_time import device

    cfg = config_of(run)
    dev = device("h100", 8, 96 if run["source"].startswith(TT) else None)  # torchtitan's H100s have 96 GB
    if efficiency is not None:
        dev = dataclasses.replace(dev, matmul_efficiency=efficiency)
    return cfg, dev, evaluate(cfg, 8 * run["nodes"], dev)


def as_fsdp(run: dict) -> float:
    """Predicted bytes per GPU of the run with its dp_replicate ranks sharding (dp_shard) instead."""
    parallel = dict(run["parallel"], dp_shard=run["parallel"]["dp_replicate"], dp_replicate=1)
    return predict(dict(run, parallel=parallel))[2].memory.total


def calibrated_efficiency(run: dict) -> float:
    """The matmul efficiency at which the planner predicts the run's published MFU (bisection: MFU rises with it)."""
    cfg = config_of(run)
    target, low, high = published_mfu(cfg, run), 0.01, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        _, dev, c = predict(run, middle)
        low, high = (middle, high) if c.time.mfu(dev, 8 * run["nodes"]) < target else (low, middle)
    return (low + high) / 2


def evaluate_run(name: str, run: dict, stack_efficiency: float) -> dict:
    cfg, dev, c = predict(run)
    _, stack_dev, stack_c = predict(run, stack_efficiency)
    world = 8 * run["nodes"]
    published = published_mfu(cfg, run)
    return {"run": name, "source": run["source"], "stack": run["stack"],
            "layout": c.layout.describe(), "gpus": world, "mfu_comparable": not run.get("float8", False),
            "published_mfu": published,
            "predicted_mfu": c.time.mfu(dev, world), "mfu_error": c.time.mfu(dev, world) / published - 1,
            "stack_efficiency": stack_efficiency, "predicted_mfu_stack": stack_c.time.mfu(stack_dev, world),
            "mfu_error_stack": stack_c.time.mfu(stack_dev, world) / published - 1,
            "published_memory_gib": run.get("memory_gib"), "predicted_memory_gib": c.memory.total / 2**30,
            "device_memory_gib": dev.memory_bytes / 2**30, "fits": c.memory.total <= dev.memory_bytes,
            "memory_terms_gib": {k: v / 2**30 for k, v in c.memory.terms.items()},
            "memory_gib_as_fsdp": as_fsdp(run) / 2**30 if run["parallel"].get("dp_replicate", 1) > 1 else None,
            "time_terms_s": c.time.terms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "plan_published.json"))
    args = parser.parse_args()
    fitted = {name: calibrated_efficiency(run) for name, run in RUNS.items() if not run.get("float8")}
    print("matmul efficiency fitted on each bf16 run:", {k: round(v, 3) for k, v in fitted.items()})
    rows = []
    for name, run in RUNS.items():
        others = [e for other, e in fitted.items() if other != name and RUNS[other]["stack"] == run["stack"]]
        rows.append(evaluate_run(name, run, sum(others) / len(others)))
        r = rows[-1]
        as_fsdp_note = "" if r["memory_gib_as_fsdp"] is None else f" ({r['memory_gib_as_fsdp']:.1f} as FSDP)"
        print(f"{name}: MFU published {100 * r['published_mfu']:.1f}%, predicted {100 * r['predicted_mfu']:.1f}% "
              f"({100 * r['mfu_error']:+.0f}%), with the stack's efficiency {100 * r['predicted_mfu_stack']:.1f}% "
              f"({100 * r['mfu_error_stack']:+.0f}%){'' if r['mfu_comparable'] else ' (not comparable: Float8)'}; "
              f"memory published {r['published_memory_gib']} GiB, predicted {r['predicted_memory_gib']:.1f} GiB"
              f"{as_fsdp_note}",
              flush=True)
    Path(args.out).write_text(json.dumps({"runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
