"""Throughput of `shardwright prepare --image-column` on generated image-text corpora of a few image sizes, as JSON.

For each size (WIDTHxHEIGHT) a corpus of --images JPEG images (quality 90; smooth gradients plus noise,
so the files are about as large as photos) with short captions is written once into --workdir as an
HF parquet file (Image feature). A 512-piece tokenizer is trained on the pydoc help topics. Then
`shardwright prepare CORPUS --image-column --force --no-progress --num-proc N` runs as a subprocess per
size and --num-proc value, --repeats times each.

Per run:
- images_per_s, patches_per_s: what prepare reports (manifest.json `stats`): reading, decoding,
  resizing, patching, tokenizing and writing, from the first input opened to the last shard closed;
- peak_rss_mib_main / _workers: the peak resident memory of the prepare process (start-up, Python,
  megatron-core and HF datasets included) and of its largest worker;
- images_per_cpu_s: images over the CPU seconds prepare's process and workers spent from the first
  input opened to the last shard closed: what a core delivers, whatever else the machine runs;
- wall_seconds: the whole command, start-up included; cpu_seconds: of the command and its workers.

    .venv/bin/python benchmarks/prepare_images.py [--sizes 256x256 640x480 1024x1024 2048x1536]
        [--images 100] [--num-proc 1 2] [--repeats 1] [--workdir /tmp/shardwright-prepare-images-bench]
        [--out benchmarks/results/prepare_images.json]

Numbers from a shared or small (e.g. 2-core) machine are noisy: the load average is recorded with each run.
"""
import argparse
import io
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.prepare_throughput import shardwright, write_report  # noqa: E402 - shardwright runs the CLI


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["256x256", "640x480", "1024x1024", "2048x1536"])
    p.add_argument("--images", type=int, default=100, help="images per corpus")
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/shardwright-prepare-images-bench")
    p.add_argument("--out", default="benchmarks/results/prepare_images.json")
    return p.parse_args()


def photo_like(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [height, width, 3]: per-channel gradients in random directions plus noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        angle, phase = rng.uniform(0, 2 * np.pi, 2)
        wave = np.sin((x * np.cos(angle) + y * np.sin(angle)) / rng.uniform(20, 200) + phase)
        channels.append(127.5 + 100 * wave + rng.normal(0, 12, (height, width)))
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def generate_corpus(path: Path, width: int, height: int, images: int, seed: int = 0) -> dict:
    import datasets
    from PIL import Image
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    rng = np.random.default_rng(seed)
    encoded, captions = [], []
    for _ in range(images):
        buffer = io.BytesIO()
        Image.fromarray(photo_like(width, height, rng)).save(buffer, format="JPEG", quality=90)
        encoded.append({"bytes": buffer.getvalue(), "path": None})
        captions.append(" ".join(words[i] for i in rng.integers(0, len(words), int(rng.integers(5, 40)))))
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": encoded, "caption": captions}, features=features).to_parquet(str(path))
    return {"path": str(path), "bytes": path.stat().st_size, "images": images, "width": width, "height": height,
            "jpeg_bytes_per_image": sum(len(e["bytes"]) for e in encoded) / images}


def main() -> int:
    from pydoc_data.topics import topics

    args = parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = workdir / "spm-512.model"
    if not tokenizer.exists():
        texts = workdir / "topics.jsonl"
        texts.write_text("".join(json.dumps({"text": topics[key]}) + "\n" for key in sorted(topics)))
        shardwright("tokenizer", "train", str(texts), "--output", str(tokenizer), "--vocab-size", "512")
    corpora = {}
    for size in args.sizes:
        width, height = map(int, size.split("x"))
        path = workdir / f"corpus-{size}-{args.images}.parquet"
        info = workdir / f"{path.name}.json"
        if not info.exists():
            print(f"generating {path} ...", flush=True)
            info.write_text(json.dumps(generate_corpus(path, width, height, args.images)))
        corpora[size] = json.loads(info.read_text())

    load_before = os.getloadavg()
    runs = []
    for repeat in range(args.repeats):
        for size, corpus in corpora.items():
            for num_proc in args.num_proc:
                out = workdir / f"prepared-{size}-np{num_proc}"
                _, wall, cpu = shardwright("prepare", corpus["path"], "--image-column", "--text-field", "caption",
                                           "--tokenizer", str(tokenizer), "--output", str(out), "--num-proc",
                                           str(num_proc), "--force", "--no-progress")
                manifest = json.loads((out / "manifest.json").read_text())
                stats = manifest["stats"]
                run = {"size": size, "num_proc": num_proc, "repeat": repeat, "images": manifest["num_images"],
                       "patches": manifest["num_patches"], "tokens": manifest["num_tokens"],
                       "patches_per_image": manifest["num_patches"] / manifest["num_images"],
                       "seconds": stats["seconds"], "images_per_s": stats["images_per_s"],
                       "patches_per_s": stats["patches_per_s"], "input_mb_per_s": corpus["bytes"] / 1e6 /
                       stats["seconds"], "peak_rss_mib_main": stats["peak_rss_mib_main"],
                       "peak_rss_mib_workers": stats["peak_rss_mib_workers"], "cpu_seconds_main":
                       stats["cpu_seconds_main"], "cpu_seconds_workers": stats["cpu_seconds_workers"],
                       "images_per_cpu_s": manifest["num_images"] / (stats["cpu_seconds_main"] +
                                                                      stats["cpu_seconds_workers"]),
                       "wall_seconds": wall, "cpu_seconds": cpu, "load_average": os.getloadavg()}
                runs.append(run)
                print(f"{size} num_proc {num_proc}: {run['images_per_s']:.1f} images/s, {run['patches_per_s']:.0f} "
                      f"patches/s in prepare ({run['patches_per_image']:.0f} patches/image), "
                      f"{run['images_per_cpu_s']:.1f} images per CPU s; peak RSS {run['peak_rss_mib_main']:.0f} MiB "
                      f"(workers {run['peak_rss_mib_workers']:.0f}); command {wall:.1f}s wall, {cpu:.1f} CPU s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    summary = {}
    for size in corpora:
        for num_proc in args.num_proc:
            mine = [r for r in runs if r["size"] == size and r["num_proc"] == num_proc]
            summary[f"{size} np{num_proc}"] = {
                key: statistics.median(r[key] for r in mine)
                for key in ("images_per_s", "patches_per_s", "peak_rss_mib_main", "peak_rss_mib_workers",
                            "images_per_cpu_s")}
    write_report(args.out, "prepare_images", load_before, summary, runs, corpora=corpora, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
