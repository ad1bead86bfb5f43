"""Throughput of `shardwright prepare` with --num-proc 1 and 2 on a generated corpus, as JSON.

The corpus is jsonl of pseudo-English (words of the pydoc help topics drawn at random, documents
of 50-1500 words), at least --megabytes MB, written once into --workdir. A tokenizer (BPE,
--vocab-size) is trained on a sample of it with `shardwright tokenizer train`. Then `shardwright
prepare ... --force` runs as a subprocess, alternating num_proc values, --repeats times each.

Three numbers per run:
- tokens_per_s: what prepare itself reports (manifest.json `stats`): reading, tokenizing and
  writing, from the first file opened to the last shard closed;
- wall_tokens_per_s: tokens over the wall time of the whole command, including Python, torch and
  megatron-core start-up (a few seconds; it matters for small corpora only);
- tokens_per_cpu_s: tokens over the CPU time (user + system) of the command and its workers,
  start-up included: what the cores deliver, whatever else the machine is doing.

    .venv/bin/python benchmarks/prepare_throughput.py [--megabytes 50] [--num-proc 1 2] [--repeats 1]
        [--workdir /tmp/shardwright-prepare-bench] [--out benchmarks/results/prepare_throughput.json]

Numbers from a shared or small (e.g. 2-core) machine are noisy: the load average at the start
and end is recorded with them.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--megabytes", type=float, default=50.0, help="corpus size (at least)")
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workdir", default="/tmp/shardwright-prepare-bench")
    p.add_argument("--out", default="benchmarks/results/prepare_throughput.json")
    return p.parse_args()


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> dict:
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    rng = np.random.default_rng(seed)
    documents = 0
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < megabytes * 1e6:
            picks = rng.integers(0, len(words), int(rng.integers(50, 1500)))
            f.write(json.dumps({"text": " ".join(words[i] for i in picks)}) + "\n")
            documents += 1
    return {"path": str(path), "bytes": path.stat().st_size, "documents": documents}


def shardwright(*args: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run the CLI; returns the result, its wall seconds and the CPU seconds (user + system) of it
    and its worker processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True,
                            text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"shardwright {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result, elapsed, cpu


def main() -> int:
    args = parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus_path = workdir / f"corpus-{args.megabytes:g}mb.jsonl"
    if not corpus_path.exists() or corpus_path.stat().st_size < args.megabytes * 1e6:
        print(f"generating {corpus_path} ...", flush=True)
        corpus = generate_corpus(corpus_path, args.megabytes)
    else:
        corpus = {"path": str(corpus_path), "bytes": corpus_path.stat().st_size,
                  "documents": sum(1 for _ in open(corpus_path, encoding="utf-8"))}
    tokenizer = workdir / f"spm-{args.vocab_size}.model"
    if not tokenizer.exists():
        print(f"training {tokenizer} ...", flush=True)
        _, seconds, _ = shardwright("tokenizer", "train", str(corpus_path), "--output", str(tokenizer),
                                 "--vocab-size", str(args.vocab_size), "--sample-documents", "3000")
        print(f"  {seconds:.1f}s", flush=True)

    load_before = os.getloadavg()
    runs = []
    for repeat in range(args.repeats):
        for num_proc in args.num_proc:
            out = workdir / f"prepared-np{num_proc}"
            _, wall, cpu = shardwright("prepare", str(corpus_path), "--tokenizer", str(tokenizer), "--output", str(out),
                                  "--num-proc", str(num_proc), "--force", "--no-progress")
            manifest = json.loads((out / "manifest.json").read_text())
            stats = manifest["stats"]
            run = {"num_proc": num_proc, "repeat": repeat, "tokens": manifest["num_tokens"],
                   "documents": manifest["num_documents"], "seconds": stats["seconds"],
                   "tokens_per_s": stats["tokens_per_s"], "documents_per_s": stats["documents_per_s"],
                   "mb_per_s": corpus["bytes"] / 1e6 / stats["seconds"], "wall_seconds": wall,
                   "wall_tokens_per_s": manifest["num_tokens"] / wall, "cpu_seconds": cpu,
                   "tokens_per_cpu_s": manifest["num_tokens"] / cpu, "load_average": os.getloadavg(),
                   "cpu_seconds_main": stats["cpu_seconds_main"], "cpu_seconds_workers": stats["cpu_seconds_workers"]}
            runs.append(run)
            print(f"num_proc {num_proc}: {run['tokens_per_s']:.0f} tokens/s ({run['mb_per_s']:.2f} MB/s) in prepare, "
                  f"{run['wall_tokens_per_s']:.0f} tokens/s over the command's {wall:.1f}s, "
                  f"{run['tokens_per_cpu_s']:.0f} tokens per CPU second (load {os.getloadavg()[0]:.1f}); CPU s in "
                  f"prepare: main {stats['cpu_seconds_main']:.1f}, workers {stats['cpu_seconds_workers']:.1f}",
                  flush=True)
    summary = {}
    for num_proc in args.num_proc:
        mine = [r for r in runs if r["num_proc"] == num_proc]
        summary[str(num_proc)] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                                  "wall_tokens_per_s": statistics.median(r["wall_tokens_per_s"] for r in mine),
                                  "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in mine)}
    if len(args.num_proc) > 1:
        base = summary[str(args.num_proc[0])]["tokens_per_s"]
        for num_proc in args.num_proc:
            summary[str(num_proc)]["speedup"] = summary[str(num_proc)]["tokens_per_s"] / base
    write_report(args.out, "prepare_throughput", load_before, summary, runs, corpus=corpus,
                 vocab_size=args.vocab_size, repeats=args.repeats)
    return 0


def write_report(out: str, benchmark: str, load_before, summary: dict, runs: list, **fields) -> None:
    """The benchmark's JSON (its fields, the machine and its load before and after, summary, runs) to `out`."""
    from launcher.metrics import describe_machine

    result = {"benchmark": benchmark, **fields, "machine": describe_machine(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "summary": summary, "runs": runs}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
