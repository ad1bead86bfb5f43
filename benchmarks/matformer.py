"""MatFormer (joint) against dense llm models of each granularity's size; loss vs params, JSON and a table.
Usage (~15 min on a loaded 2-core CPU): .venv/bin/python benchmarks/matformer.py [--steps 300] [--eval-every 50]
    [--config configs/matformer/tiny.yaml] [--mix 1,0.5,0.25,0.125 ...] [--set section.key=value ...] [--work DIR]

One MatFormer trains jointly (every step runs its batch through each granularity, loss sum_i L_i); then,
for each granularity, a dense `llm` of exactly that size (model.ffn_hidden_dims = [units] * n_layers, the
rest of the model section the same) trains separately on the same data in the same order, with the same
steps, seed, batch, micro-batch, learning rate and schedule. The MatFormer's eval records every
granularity (eval_loss_g<f>) and every Mix'n'Match vector given with --mix (eval_loss_mix<i>) on the same
eval batches the dense runs use (same loader, same seed).

Reported per submodel: parameters (total, and non-embedding = total less the input embedding and the
output head, both vocab x dim), the MatFormer's final eval loss, the dense run's (for a granularity) or,
for a Mix'n'Match vector, the dense curve interpolated at its non-embedding parameter count (linear in
log params between the neighbouring dense sizes), and the MatFormer's own granularity curve at that count.
Compute per run from its metrics.jsonl: total training FLOPs (sum over steps of the trainer's exact
per-step count) and tokens of data per second (mean over steps after the first, as the trainer's summary).
One process each, fp32, sequentially in this Python process; the runs go under --work (default: a
temporary directory). A single seed: differences of the size of seed noise are not resolved (see --set
train.seed=N to repeat with another).
"""
import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import yaml

from launcher.config import _apply_override, load_config
from launcher.metrics import describe_machine, read_records
from launcher.trainer import train
from models import get_model_spec
from models.llm.model import LLMConfig, Transformer
from models.matformer.model import MatFormer, MatFormerConfig

DEFAULT_MIX = ["0.125,0.25,0.5,1", "0.25,0.25,0.5,0.5", "0.5,0.5,1,1", "1,0.5,0.25,0.125"]
MATFORMER_ONLY = {f.name for f in dataclasses.fields(MatFormerConfig)} - {f.name for f in dataclasses.fields(LLMConfig)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/matformer/tiny.yaml", help="the MatFormer's config (family matformer)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--mix", action="append", default=[], metavar="F,F,...",
                   help=f"a Mix'n'Match vector, a granularity per layer (repeatable; default {' '.join(DEFAULT_MIX)})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="applied to every run (a model key only the matformer family has applies to it alone)")
    p.add_argument("--work", default="", help="where the runs go (default: a temporary directory)")
    p.add_argument("--reuse", action="store_true",
                   help="keep runs under --work that already reached --steps (re-render the table from them)")
    p.add_argument("--out", default="benchmarks/results/matformer.json")
    return p.parse_args()


def run_configs(args, mix: list[list[float]]) -> tuple[dict, dict[str, dict]]:
    """(the MatFormer's raw config, {granularity name: the dense llm's raw config}) with --set applied."""
    raw = yaml.safe_load(Path(args.config).read_text())
    for assignment in args.overrides:
        _apply_override(raw, assignment)
    raw["model"]["mix_n_match"] = mix
    if raw["model"].get("family") != "matformer":
        raise SystemExit(f"{args.config}: model.family is {raw['model'].get('family')}, not matformer")
    args_ = {k: v for k, v in raw["model"].items() if k != "family"}
    model_cfg = MatFormerConfig(**{"vocab_size": raw.get("data", {}).get("vocab_size", 0), **args_})
    dense = {}
    for fraction in model_cfg.granularities:
        d = json.loads(json.dumps(raw))
        d["model"] = {k: v for k, v in raw["model"].items() if k not in MATFORMER_ONLY}
        d["model"]["family"] = "llm"
        d["model"]["ffn_hidden_dims"] = [model_cfg.units(fraction)] * model_cfg.n_layers
        dense[f"g{fraction:g}"] = d
    return raw, dense


def param_counts(llm_cfg: LLMConfig, widths: list[int]) -> dict:
    """Parameters of the dense llm with these per-layer FFN widths: the extracted submodel is exactly this."""
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(llm_cfg, ffn_hidden_dims=list(widths)))
    total = sum(p.numel() for p in model.parameters())
    vocab = sum(p.numel() for name, p in model.named_parameters() if name.split(".")[0] in ("tok_embeddings", "output"))
    return {"total": total, "non_embedding": total - vocab}


def run_record(run_dir: Path, wall_s: float) -> dict:
    """Compute and losses of a finished run from its metrics.jsonl and config."""
    cfg = load_config(run_dir / "config.yaml")
    t = cfg.train
    tokens_per_step = t.global_batch_size * t.seq_len
    records, _ = read_records(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r and "tokens_per_s" in r]
    evals = [r for r in records if "eval_loss" in r]
    # tflops = flops_per_token * tokens_per_s / world / 1e12 (launcher/trainer.py), one process here
    step_flops = [r["tflops"] * 1e12 / r["tokens_per_s"] * tokens_per_step for r in steps]
    steady = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
    step_seconds = sum(tokens_per_step / r["tokens_per_s"] for r in steps)
    return {"dir": str(run_dir), "family": cfg.model.family, "steps": len(steps),
            "tokens": len(steps) * tokens_per_step,
            "flops_per_token": get_model_spec(cfg.model.family).flops_per_token(cfg.model_config(), t.seq_len),
            "total_flops": sum(step_flops), "tokens_per_s": sum(steady) / len(steady),
            "training_flop_per_s": sum(step_flops) / step_seconds, "step_seconds": step_seconds,
            "wall_s": wall_s, "final_train_loss": steps[-1]["loss"], "final_eval": evals[-1], "evals": evals}


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x, linear in log x between the neighbouring points; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return None


def delta(a: float, b: float | None) -> str:
    return "n/a" if b is None else f"{a - b:+.4f} ({100 * (a - b) / b:+.2f}%)"


def table(result: dict) -> str:
    out = [f"# MatFormer vs dense: {result['steps']} steps, {result['config']}, seed {result['seed']}", "",
           "Final eval loss (lower is better) on the same eval batches; delta = MatFormer - dense (negative: the",
           "MatFormer submodel is better). Mix'n'Match rows compare with the dense curve and with the MatFormer's",
           "own granularity curve, each interpolated linearly in log(non-embedding params) at the vector's size.",
           "Non-embedding params leave out the input embedding and the output head (vocab x dim each).", "",
           "| submodel | FFN widths per layer (fractions) | non-emb params | total params | MatFormer | dense "
           "| delta vs dense | MatFormer g-curve | delta vs g-curve |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["submodels"]:
        loss, params = r["matformer_eval_loss"], r["params"]
        fractions = ", ".join(f"{f:g}" for f in r["fractions"])
        if r["kind"] == "granularity":
            dense, g = r["dense_eval_loss"], None
            dense_s = f"{dense:.4f}"
        else:
            dense, g = r["dense_curve_eval_loss"], r["matformer_curve_eval_loss"]
            dense_s = "n/a" if dense is None else f"{dense:.4f} (interp.)"
        g_s, g_delta = ("-", "-") if g is None else (f"{g:.4f}", delta(loss, g))
        out.append(f"| {r['name']} | {r['widths']} ({fractions}) | {params['non_embedding']:,} | {params['total']:,} "
                   f"| {loss:.4f} | {dense_s} | {delta(loss, dense)} | {g_s} | {g_delta} |")
    granularities = [r["name"] for r in result["submodels"] if r["kind"] == "granularity"]
    out += ["", "Eval loss during training, MatFormer / dense, per granularity:", "",
            "| step | " + " | ".join(granularities) + " |", "|---:|" + "---:|" * len(granularities)]
    dense_at = {g: {e["step"]: e["eval_loss"] for e in result["runs"][f"dense_{g}"]["evals"]} for g in granularities}
    for e in result["runs"]["matformer"]["evals"]:
        cells = [f"{e[f'eval_loss_{g}']:.4f} / {dense_at[g][e['step']]:.4f}" if e["step"] in dense_at[g] else "-"
                 for g in granularities]
        out.append(f"| {e['step']} | " + " | ".join(cells) + " |")
    out += ["", "Compute: one process per run, fp32, sequential on this machine. FLOPs are the trainer's exact",
            "per-step count summed over the steps of each run's metrics.jsonl; tokens/s counts tokens of data (the",
            "joint run pushes each token through every granularity).", "",
            "| run | FLOPs/token of data | total training FLOPs | tokens of data/s | achieved GFLOP/s | wall s |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["runs"].items():
        out.append(f"| {name} | {r['flops_per_token']:.3e} | {r['total_flops']:.3e} | {r['tokens_per_s']:.0f} "
                   f"| {r['training_flop_per_s'] / 1e9:.1f} | {r['wall_s']:.0f} |")
    out += ["", "Reading (generated from the numbers above):", ""]
    return "\n".join(out + [f"- {line}" for line in reading(result)]) + "\n"


def reading(result: dict) -> list[str]:
    """Plain statements of what the table shows: which side wins each comparison and by how much."""
    rows, lines = result["submodels"], []
    for r in rows:
        if r["kind"] == "granularity":
            d = r["matformer_eval_loss"] - r["dense_eval_loss"]
            lines.append(f"{r['name']}: the MatFormer submodel is {'better' if d < 0 else 'worse'} than the dense "
                         f"model of its size by {abs(d):.4f} ({100 * abs(d) / r['dense_eval_loss']:.2f}%).")
    mixes = [r for r in rows if r["kind"] == "mix_n_match"]
    for r in mixes:
        d, g = r["dense_curve_eval_loss"], r["matformer_curve_eval_loss"]
        if d is None:
            lines.append(f"{r['name']} {r['fractions']}: outside the dense sizes, not interpolated.")
            continue
        lines.append(f"{r['name']} {r['fractions']}: {r['matformer_eval_loss'] - d:+.4f} from the dense curve and "
                     f"{r['matformer_eval_loss'] - g:+.4f} from the MatFormer's granularity curve at its size "
                     f"(negative: below the curve, i.e. better).")
    for i, a in enumerate(mixes):
        for b in mixes[i + 1:]:
            if a["params"]["total"] == b["params"]["total"]:
                better, worse = sorted((a, b), key=lambda r: r["matformer_eval_loss"])
                gap = worse["matformer_eval_loss"] - better["matformer_eval_loss"]
                lines.append(f"{a['name']} and {b['name']} have the same parameters; {better['name']} "
                             f"{better['fractions']} is better by {gap:.4f}.")
    c = result["compute"]
    wall_ratio = c["matformer_wall_s"] / c["dense_sum_wall_s"]
    lines.append(f"Compute: the joint run's training FLOPs are {c['matformer_over_dense_sum']:.3f} x those of the "
                 f"{c['dense_runs']} dense runs together, its wall time {wall_ratio:.2f} x theirs (a shared machine: "
                 f"wall times are indicative only).")
    lines.append(f"One seed (train.seed={result['seed']}); eval on {result['eval_tokens']:,} tokens, the same for "
                 f"every run: differences of the order of seed-to-seed noise are not resolved by one run.")
    return lines


def main() -> None:
    args = parse_args()
    mix = [[float(f) for f in v.split(",")] for v in (args.mix or DEFAULT_MIX)]
    work = Path(args.work or tempfile.mkdtemp(prefix="matformer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    common = [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", "train.sample_prompt=",
              "checkpoint.every=0", "run.tensorboard=false", "run.log_every=25"]
    mf_raw, dense_raw = run_configs(args, mix)
    started = time.perf_counter()
    runs = {}
    for name, raw in [("matformer", mf_raw), *((f"dense_{g}", d) for g, d in dense_raw.items())]:
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        run_dir, wall_file = work / name, work / f"{name}.wall_s"
        if not (args.reuse and wall_file.exists() and run_record(run_dir, 0)["steps"] == args.steps):
            t0 = time.perf_counter()
            train(load_config(path, [*common, f"run.dir={run_dir}"]))
            wall_file.write_text(f"{time.perf_counter() - t0}\n")
        runs[name] = run_record(run_dir, float(wall_file.read_text()))
        print(f"[matformer bench] {name}: eval loss {runs[name]['final_eval']['eval_loss']:.4f}, "
              f"{runs[name]['tokens_per_s']:.0f} tokens/s, {runs[name]['wall_s']:.0f} s", flush=True)

    mf_cfg = load_config(work / "matformer" / "config.yaml")
    model_cfg = mf_cfg.model_config()
    llm_cfg = load_config(work / f"dense_{next(iter(dense_raw))}" / "config.yaml").model_config()
    mf_eval = runs["matformer"]["final_eval"]
    n = len(model_cfg.granularities)
    submodels = []
    for i, (name, widths) in enumerate(model_cfg.submodels()):
        fractions = [model_cfg.granularities[i]] * model_cfg.n_layers if i < n else model_cfg.mix_n_match[i - n]
        row = {"name": name, "kind": "granularity" if i < n else "mix_n_match", "widths": widths,
               "fractions": fractions,
               "params": param_counts(llm_cfg, widths), "matformer_eval_loss": mf_eval[f"eval_loss_{name}"]}
        if i < n:
            row["dense_eval_loss"] = runs[f"dense_{name}"]["final_eval"]["eval_loss"]
        submodels.append(row)
    dense_curve = [(r["params"]["non_embedding"], r["dense_eval_loss"]) for r in submodels[:n]]
    matformer_curve = [(r["params"]["non_embedding"], r["matformer_eval_loss"]) for r in submodels[:n]]
    for r in submodels[n:]:
        r["dense_curve_eval_loss"] = interpolate(dense_curve, r["params"]["non_embedding"])
        r["matformer_curve_eval_loss"] = interpolate(matformer_curve, r["params"]["non_embedding"])
    with torch.device("meta"):
        matformer_params = sum(p.numel() for p in MatFormer(model_cfg).parameters())
    dense_names = [name for name in runs if name != "matformer"]
    dense_flops = sum(runs[name]["total_flops"] for name in dense_names)
    result = {
        "benchmark": "matformer", "config": args.config, "overrides": args.overrides, "steps": args.steps,
        "eval_every": args.eval_every, "seed": mf_cfg.train.seed,
        "eval_tokens": mf_cfg.train.eval_batches * mf_cfg.train.global_batch_size * mf_cfg.train.seq_len,
        "matformer_model": dataclasses.asdict(model_cfg), "matformer_params": matformer_params,
        "machine": describe_machine(), "script_wall_s": time.perf_counter() - started,
        "submodels": submodels,
        "compute": {"matformer_total_flops": runs["matformer"]["total_flops"], "dense_runs": len(dense_names),
                    "dense_sum_total_flops": dense_flops,
                    "matformer_over_dense_sum": runs["matformer"]["total_flops"] / dense_flops,
                    "matformer_wall_s": runs["matformer"]["wall_s"],
                    "dense_sum_wall_s": sum(runs[name]["wall_s"] for name in dense_names)},
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    markdown = table(result)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
