"""Checkpoint conversion of a 1B-class model: seconds and peak resident memory of each step, as JSON.

A Llama-3.2-1B-shaped `llm` (dim 2048, 16 layers, 32 heads, 8 kv heads, ffn 8192; the embedded corpus's
vocabulary) is initialized and saved as a native checkpoint (one process, fp32), then, each in a fresh
process so that its peak RSS is its own:

- export: `shardwright convert to-hf` in fp32 and in bf16 (safetensors shards of --max-shard-size), and in fp32
  with 500MB shards;
- import: `checkpoint.init_from` of the fp32 export, and of the native checkpoint, into the model already
  materialized (as train does: the import's own memory is the peak minus the RSS before it);
- consolidate: `shardwright convert to-file` (holds the model once by design), and its import;
- baseline: a process with torch and the launcher imported and nothing done (what every peak includes).

Streaming is the point: an export holds one shard and one layer, an import one layer, so their peaks should
stay well under the model's size (fp32: 4 bytes a parameter) and, for an export, follow the shard size.

    .venv/bin/python benchmarks/convert.py [--work DIR] [--max-shard-size 2GB] [--out benchmarks/results/convert.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = ["model.dim=2048", "model.n_layers=16", "model.n_heads=32", "model.n_kv_heads=8", "model.multiple_of=1024",
         "model.ffn_dim_multiplier=1.5", "model.rope_theta=500000", "train.seq_len=2048"]

# Runs in a child process: argv = [step, run config, args...]; prints one JSON line.
CHILD = r'''
import json, sys, time
from pathlib import Path
step, config, *rest = sys.argv[1:]

def status_gib(field):  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's at fork); VmRSS: now
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 2**20

from launcher.config import load_config
cfg = load_config(Path(config))
result = {}
if step == "baseline":  # the interpreter with torch and the launcher imported, nothing else
    import launcher.convert, launcher.init_from
    result["seconds"] = 0.0
elif step in ("to-hf", "to-file"):
    from launcher.convert import convert
    start = time.perf_counter()
    convert(step, cfg.run.dir, *rest, log=lambda _: None)
    result["seconds"] = time.perf_counter() - start
else:  # import: init_from rest[0] into the materialized model
    import torch
    from launcher.init_from import open_starting_weights
    from models import get_model_spec
    from parallel.init import materialize
    spec = get_model_spec("llm")
    with torch.device("meta"):
        model = spec.model_cls(cfg.model_config())
    materialize(model, torch.device("cpu"), 0)
    result["rss_before_gib"] = status_gib("VmRSS")
    start = time.perf_counter()
    open_starting_weights(rest[0], spec, cfg.model_config()).load([model])
    result["seconds"] = time.perf_counter() - start
result["peak_rss_gib"] = status_gib("VmHWM")
print(json.dumps(result))
'''


def child(step: str, config: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, "-c", CHILD, step, str(config), *args], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{step} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_source(work: Path) -> tuple[Path, int]:
    """A native checkpoint of the 1B-class model at step 0 and its config.yaml; returns (config, parameters)."""
    import torch

    from launcher.checkpoint import Checkpointer, ModelState, checkpoint_meta
    from launcher.config import load_config
    from launcher.convert import build_model, one_process_world, source_loaders
    from models import get_model_spec
    from parallel.mesh import ParallelDims

    cfg = load_config(REPO / "configs" / "llm" / "tiny.yaml", [f"run.dir={work / 'source'}", *SHAPE])
    spec = get_model_spec("llm")
    data, _, _ = spec.data.build_loaders(cfg.data, cfg.train.seq_len, cfg.train.global_batch_size,
                                         cfg.train.micro_batch_size, 0, 1, cfg.train.seed, log=print)
    with one_process_world(cfg.run.timeout_s):
        model = build_model(spec, cfg)
        parameters = sum(p.numel() for p in model.parameters())
        meta = checkpoint_meta(cfg, data.tokenizer.fingerprint, ParallelDims.resolve(dp_shard=1, world_size=1))
        Checkpointer(work / "source", keep_last=1, rank=0).save(0, {"model": ModelState([model])}, meta)
    cfg.dump(work / "source" / "config.yaml")
    del model, torch
    return work / "source" / "config.yaml", parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "convert.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    config, parameters = write_source(work)
    print(f"source: {parameters / 1e9:.3f}B parameters, saved in {time.perf_counter() - start:.1f} s", flush=True)
    model_gib = parameters * 4 / 2**30
    steps = {
        "baseline": child("baseline", config),
        "export_hf_fp32": child("to-hf", config, str(work / "hf32"), "--max-shard-size", args.max_shard_size),
        "export_hf_bf16": child("to-hf", config, str(work / "hf16"), "--dtype", "bf16", "--max-shard-size",
                                args.max_shard_size),
        "export_hf_fp32_500MB_shards": child("to-hf", config, str(work / "hf32-small"), "--max-shard-size", "500MB"),
        "import_hf_fp32": child("import", config, str(work / "hf32")),
        "import_native": child("import", config, str(work / "source")),
        "export_file_fp32": child("to-file", config, str(work / "weights.safetensors")),
        "import_file_fp32": child("import", config, str(work / "weights.safetensors")),
    }
    for name, result in steps.items():
        if "rss_before_gib" in result:
            result["import_own_gib"] = result["peak_rss_gib"] - result["rss_before_gib"]
        print(f"{name}: {result['seconds']:.1f} s, peak RSS {result['peak_rss_gib']:.2f} GiB"
              + (f" ({result['import_own_gib']:.2f} GiB above the materialized model)" if "import_own_gib" in result
                 else "") + f"; the model is {model_gib:.2f} GiB in fp32", flush=True)
    from launcher.metrics import describe_machine

    report = {"benchmark": "convert", "parameters": parameters, "model_fp32_gib": model_gib,
              "max_shard_size": args.max_shard_size, "shape": SHAPE, "steps": steps, "machine": describe_machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
