"""TokenFormer growth against training the grown size from scratch: loss against training FLOPs, as JSON.

Three arms train the same data in the same order with the same learning-rate schedule (cosine over
`--before + --after` steps, the config's warm-up):

- growth: the small model (`--small-tokens`) trains `--before` steps, `shardwright convert grow`
  (preserving, optimizer carried) adds tokens up to the config's counts, and the grown run resumes
  for `--after` steps;
- scratch: the config's model (the grown size) trains all `--before + --after` steps;
- small: the small model trains all the steps (the control: does growing beat not growing?). Its
  checkpoint at step `--before` is the one the growth arm grows, so their first steps are the same run.

Training FLOPs are the family's exact `flops_per_token` (ModelSpec) times the tokens of each step,
with the small config's count for the steps before growth. Evals every `--eval-every` steps and at
the end (the config's eval_batches). One process, fp32, in this Python process; the runs go under
`--work` (a temporary directory by default).

    .venv/bin/python benchmarks/tokenformer_growth.py [--config configs/tokenformer/tiny.yaml]
        [--small-tokens 64,64,256] [--before 100] [--after 100] [--eval-every 25] [--set section.key=value ...]
        [--out benchmarks/results/tokenformer_growth.json]
"""
import argparse
import json
import tempfile
from statistics import mean
import time
from pathlib import Path

from launcher.config import load_config
from launcher.convert import convert
from launcher.metrics import describe_machine
from launcher.trainer import train
from models import get_model_spec
from models.spec import architecture

KINDS = ("qkv", "proj", "ffn")
LOSS_WINDOW = 10  # training losses are averaged over this many steps where two arms are compared


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tokenformer/tiny.yaml", help="the grown (and scratch) model's config")
    p.add_argument("--small-tokens", default="64,64,256", help="qkv,proj,ffn tokens of the model before growth")
    p.add_argument("--before", type=int, default=100, help="steps of the small model before growth")
    p.add_argument("--after", type=int, default=100, help="steps after growth")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--work", default="", help="where the runs go (default: a temporary directory)")
    p.add_argument("--out", default="benchmarks/results/tokenformer_growth.json")
    return p.parse_args()


def records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training step records, eval records) of a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval_loss" in r]


def flops_per_step(run_dir: Path) -> float:
    cfg = load_config(run_dir / "config.yaml")
    t = cfg.train
    flops_per_token = get_model_spec(cfg.model.family).flops_per_token(cfg.model_config(), t.seq_len)
    return flops_per_token * t.global_batch_size * t.seq_len


def curve(phases: list[tuple[Path, int]]) -> dict:
    """Loss and eval loss against cumulative training FLOPs over the runs of an arm, in step order, each run
    up to the step given with it."""
    steps, losses, flops, evals, total = [], [], [], [], 0.0
    for run_dir, last_step in phases:
        per_step = flops_per_step(run_dir)
        train_records, eval_records = records(run_dir)
        train_records = [r for r in train_records if r["step"] <= last_step]
        eval_records = [r for r in eval_records if r["step"] <= last_step]
        flops_at = {}
        for record in train_records:
            total += per_step
            steps.append(record["step"])
            losses.append(record["loss"])
            flops.append(total)
            flops_at[record["step"]] = total
        evals += [{"step": r["step"], "flops": flops_at[r["step"]], "eval_loss": r["eval_loss"]} for r in eval_records]
    return {"steps": steps, "loss": losses, "flops": flops, "evals": evals, "total_flops": total,
            "final_eval_loss": evals[-1]["eval_loss"]}


def at_flops(arm: dict, flops: float) -> dict:
    """An arm's eval loss (linear in FLOPs between its evals) and mean training loss over the LOSS_WINDOW steps
    ending where its cumulative FLOPs reach `flops`."""
    evals = arm["evals"]
    after = next(i for i, e in enumerate(evals) if e["flops"] >= flops)
    if after == 0 or evals[after]["flops"] == flops:
        eval_loss = evals[after]["eval_loss"]
    else:
        a, b = evals[after - 1], evals[after]
        fraction = (flops - a["flops"]) / (b["flops"] - a["flops"])
        eval_loss = a["eval_loss"] + (b["eval_loss"] - a["eval_loss"]) * fraction
    end = next(i for i, f in enumerate(arm["flops"]) if f >= flops) + 1
    return {"step": arm["steps"][end - 1], "eval_loss": eval_loss,
            "train_loss_mean": mean(arm["loss"][max(0, end - LOSS_WINDOW):end])}


def main() -> None:
    args = parse_args()
    small_tokens = [int(n) for n in args.small_tokens.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="tokenformer-growth-"))
    total = args.before + args.after
    common = [*args.overrides, f"train.steps={total}", f"train.eval_every={args.eval_every}", "train.sample_prompt=",
              "checkpoint.every=0", "checkpoint.keep_last=2", "run.tensorboard=false", "run.log_every=25"]
    grown_cfg = load_config(args.config, common).model_config()
    started = time.perf_counter()

    small, grown, scratch = work / "small", work / "grown", work / "scratch"
    train(load_config(args.config, [*common, f"run.dir={small}", f"checkpoint.every={args.before}",
                                    *(f"model.{kind}_tokens={n}" for kind, n in zip(KINDS, small_tokens))]))
    convert("grow", small / "checkpoints" / f"step-{args.before}", grown,
            *(option for kind in KINDS for option in (f"--{kind}-tokens", str(getattr(grown_cfg, f"{kind}_tokens")))))
    train(load_config(grown / "config.yaml"))
    train(load_config(args.config, [*common, f"run.dir={scratch}"]))

    arms = {"growth": curve([(small, args.before), (grown, total)]), "scratch": curve([(scratch, total)]),
            "small": curve([(small, total)])}
    growth, from_scratch = arms["growth"], arms["scratch"]
    equal_flops = at_flops(from_scratch, growth["total_flops"])
    result = {
        "benchmark": "tokenformer_growth", "config": args.config, "overrides": args.overrides,
        "steps_before_growth": args.before, "steps_after_growth": args.after, "eval_every": args.eval_every,
        "small_model": architecture(load_config(small / "config.yaml").model_config()),
        "grown_model": architecture(load_config(grown / "config.yaml").model_config()),
        "scratch_model": architecture(grown_cfg),
        "flops_per_step": {name: flops_per_step(run) for name, run in (("small", small), ("grown", grown),
                                                                         ("scratch", scratch))},
        "machine": describe_machine(), "wall_s": time.perf_counter() - started,
        "summary": {
            "growth_final_eval_loss": growth["final_eval_loss"], "growth_total_flops": growth["total_flops"],
            "scratch_final_eval_loss": from_scratch["final_eval_loss"],
            "scratch_total_flops": from_scratch["total_flops"],
            "small_final_eval_loss": arms["small"]["final_eval_loss"],
            "small_total_flops": arms["small"]["total_flops"],
            "growth_flops_over_scratch": growth["total_flops"] / from_scratch["total_flops"],
            "scratch_at_growth_total_flops": equal_flops,
            "growth_train_loss_mean_last": mean(growth["loss"][-LOSS_WINDOW:]),
            "scratch_train_loss_mean_last": mean(from_scratch["loss"][-LOSS_WINDOW:]),
            "small_train_loss_mean_last": mean(arms["small"]["loss"][-LOSS_WINDOW:]),
            "loss_before_growth": growth["loss"][args.before - 1], "loss_after_growth": growth["loss"][args.before],
        },
        "arms": arms,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
