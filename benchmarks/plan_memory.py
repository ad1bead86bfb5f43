"""Predicted (shardwright plan's memory model) vs measured peak live tensor bytes per rank, as JSON.

Measured: the unchanged trainer runs two steps (and one eval batch) of each layout under LiveBytes (every storage
an op creates, counted until freed; not RSS), on every rank of a gloo world; the most loaded rank is compared.
Predicted: planner.predict.predict_memory of the same config, fp32 as on CPU.

    python benchmarks/plan_memory.py [--out benchmarks/results/plan_memory.json] [--only NAME ...]
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLM, MOE = "configs/llm/tiny.yaml", "configs/moe/tiny.yaml"
PP = ("parallel.pp=2", "parallel.dp_shard=1")
# name -> (world size, config, overrides). The tiny configs' global batch of 16 rows of 128 tokens, 2 micro-batches
# per dp rank unless said otherwise.
LAYOUTS = {
    "llm dp1": (1, LLM, []),
    "llm dp1 ac=full": (1, LLM, ["train.activation_checkpoint=full"]),
    "llm dp1 ac=selective": (1, LLM, ["train.activation_checkpoint=selective"]),
    "moe dp1 mbs=16": (1, MOE, ["train.micro_batch_size=16"]),
    "llm fsdp2": (2, LLM, []),
    "llm fsdp2 ac=full": (2, LLM, ["train.activation_checkpoint=full"]),
    "llm ddp2": (2, LLM, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    "llm tp2": (2, LLM, ["parallel.tp=2", "parallel.dp_shard=1"]),
    "llm tp2 ac=selective": (2, LLM, ["parallel.tp=2", "parallel.dp_shard=1", "train.activation_checkpoint=selective"]),
    "llm cp2": (2, LLM, ["parallel.cp=2", "parallel.dp_shard=1"]),
    "llm pp2 gpipe": (2, LLM, [*PP, "parallel.pp_schedule=gpipe", "train.micro_batch_size=4"]),
    "llm pp2 1f1b": (2, LLM, [*PP, "parallel.pp_schedule=1f1b", "train.micro_batch_size=4"]),
    "llm pp2 interleaved-1f1b": (2, LLM, [*PP, "parallel.pp_schedule=interleaved-1f1b", "parallel.pp_stages_per_rank=2",
                                          "train.micro_batch_size=4"]),
    "llm pp2 zbv": (2, LLM, [*PP, "parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=2",
                             "train.micro_batch_size=4"]),
    "moe ep2": (2, MOE, ["parallel.ep=2"]),
    "moe ep2 ac=full": (2, MOE, ["parallel.ep=2", "train.activation_checkpoint=full"]),
}


def predicted(config: str, overrides: list[str], world: int) -> dict:
    from launcher.config import load_config
    from planner.predict import predict_memory

    memory = predict_memory(load_config(REPO / config, overrides), world)
    return {"bytes": memory.total, "terms": memory.terms, "pp_rank": memory.pp_rank}


def run(names: list[str], workdir: Path) -> list[dict]:
    from tests.distributed.harness import run_world

    rows = []
    for world in sorted({LAYOUTS[n][0] for n in names}):
        group = [n for n in names if LAYOUTS[n][0] == world]
        checks = [("planner.measure:measured_peak", {"config": str(REPO / LAYOUTS[n][1]), "overrides": LAYOUTS[n][2],
                                                      "run_dir": str(workdir / f"run{i}")}) for i, n in enumerate(group)]
        results = run_world(world, checks, workdir / f"world{world}", timeout_s=1200)
        for name, result in zip(group, results):
            per_rank = [result.value(rank) for rank in range(world)]
            _, config, overrides = LAYOUTS[name]
            prediction = predicted(config, overrides, world)
            measured = max(per_rank)
            rows.append({"layout": name, "world": world, "config": config, "overrides": overrides,
                         "measured_bytes_per_rank": per_rank, "measured_bytes": measured,
                         "predicted_bytes": prediction["bytes"], "predicted_terms": prediction["terms"],
                         "error": prediction["bytes"] / measured - 1})
            print(f"{name:28s} measured {measured / 2**20:7.1f} MiB  predicted {prediction['bytes'] / 2**20:7.1f} MiB"
                  f"  error {100 * rows[-1]['error']:+5.1f}%", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "plan_memory.json"))
    parser.add_argument("--only", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS), metavar="NAME")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.only, Path(tmp))
    Path(args.out).write_text(json.dumps({"tolerance": 0.15, "layouts": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
