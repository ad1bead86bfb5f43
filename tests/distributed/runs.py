"""Training runs as harness checks, the loss comparison every run-level parity test uses, and its
negative control."""
import ast
import re
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

from tests.conftest import TINY, cached_tokenizer, tiny_overrides

RTOL = 1e-5  # fp32 run-level parity: relative difference of per-step losses
# A short greedy sample after training: equal weights under any layout give the same text.
SAMPLE = ("train.sample_prompt=The with statement", "train.sample_tokens=8")


def train_losses(run_dir: str, cache: str, overrides: list[str], config: str = "") -> list[float]:
    """Check body, run on every rank of a world: one training run, its per-step losses."""
    return train_summary(run_dir, cache, overrides, config)["losses"]


def train_summary(run_dir: str, cache: str, overrides: list[str], config: str = "") -> dict:
    """Check body: one training run of `config` (default: the tiny LLM); its per-step losses, final eval loss and
    final eval record (every eval metric), and how parallelize left the model (recording_layouts)."""
    from launcher.config import load_config
    from launcher.trainer import train

    with recording_layouts() as layouts:
        summary = train(load_config(Path(config) if config else TINY,
                                    tiny_overrides(Path(run_dir), Path(cache), *overrides)))
    return {"losses": summary["losses"], "eval_loss": summary["eval_loss"], "eval": summary["eval"],
            "sample": summary["sample"], "layout": layouts}


@contextmanager
def recording_layouts():
    """A list that fills, while the context is open, with how the trainer's parallelize left each model part it
    returned: the set of its parameters' (mesh dims, placements), "plain" for a plain tensor; the number of FSDP
    units; whether DDP (replicate) holds it. A run-level parity test asserts from it that its run was sharded:
    a run whose parallelism was skipped gives the one-process losses too."""
    from torch.distributed._composable.replicate import replicate
    from torch.distributed.fsdp import FSDPModule

    import launcher.trainer
    from tests.distributed.sharding import placements

    real_parallelize, layouts = launcher.trainer.parallelize, []

    def parallelize(*args, **kwargs):
        model = real_parallelize(*args, **kwargs)
        layouts.append({"placements": sorted({"plain" if where is None else f"{where[0]} {where[1]}"
                                              for where in placements(model).values()}),
                        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
                        "ddp": replicate.state(model) is not None})
        return model

    with patch.object(launcher.trainer, "parallelize", parallelize):
        yield layouts


def sharded_over(layouts: list[dict]) -> list[set[str]]:
    """For each model part of recording_layouts' record, the mesh dims some parameter of it is sharded over
    (a Shard or _StridedShard placement on that dim)."""
    dims_of_parts = []
    for layout in layouts:
        dims = set()
        for where in layout["placements"]:
            if where != "plain":
                names, placements = where.split(") (")
                for name, placement in zip(ast.literal_eval(names + ")"), re.findall(r"\w+\([^()]*\)", placements)):
                    if "Shard" in placement:
                        dims.add(name)
        dims_of_parts.append(dims)
    return dims_of_parts


def assert_sharded_over(layouts: list[dict], *mesh_dims: str) -> None:
    """The run parallelized at least one model part, and every part has parameters sharded over each of
    `mesh_dims`: a run whose parallelism was skipped would give the one-process losses too."""
    assert layouts, "the run recorded no model part from parallelize"
    for dims in sharded_over(layouts):
        assert set(mesh_dims) <= dims, (mesh_dims, layouts)


def pipeline_outputs_kept(run_dir: str, cache: str, overrides: list[str], keep: bool = False) -> dict:
    """Check body: one training run under pp; after every pipeline step, how many micro-batch outputs this
    rank's stages still hold, and the losses. `keep`: the schedule asked to return its outputs (torch's
    default), the negative control."""
    from parallel.pipeline import Pipeline

    real_run, kept = Pipeline.run, []

    def run(self, *args, **kwargs):
        if keep:
            step = self.schedule.step
            self.schedule.step = lambda *a, **k: step(*a, **{**k, "return_outputs": True})
        try:
            real_run(self, *args, **kwargs)
        finally:
            if keep:
                del self.schedule.step
        kept.append(sum(len(stage.output_chunks) for stage in self.stages))

    with patch.object(Pipeline, "run", run):
        losses = train_losses(run_dir, cache, overrides)
    return {"most_kept": max(kept), "losses": losses}


def pipeline_summary(run_dir: str, cache: str, overrides: list[str]) -> dict:
    """Check body: train_summary of a run under pp, with the class names of the torch schedules that ran its steps
    (the schedule's name in the config picks one; every other schedule would give the same losses)."""
    from parallel.pipeline import Pipeline

    real_run, schedules = Pipeline.run, set()

    def run(self, *args, **kwargs):
        schedules.add(type(self.schedule).__name__)
        return real_run(self, *args, **kwargs)

    with patch.object(Pipeline, "run", run):
        summary = train_summary(run_dir, cache, overrides)
    return {**summary, "schedules": sorted(schedules)}


def hf_directory(directory: Path, cache: Path, seed: int = 7) -> Path:
    """A Hugging Face directory (fp32) of the tiny LLM of tiny_overrides initialized with `seed` (the runs use
    another, so a run that starts from it shows in its losses), written in this process; returns it."""
    import torch

    from launcher.config import load_config
    from launcher.convert import build_model
    from launcher.hf_files import write_hf_directory
    from models import get_model_spec

    cfg = load_config(TINY, tiny_overrides(directory.parent / "unused", cache, f"train.seed={seed}"))
    adapter, model_cfg = get_model_spec("llm").state_dict_adapters["hf"], cfg.model_config()
    tensors = adapter.from_native(build_model(get_model_spec("llm"), cfg).state_dict(), model_cfg)
    directory.mkdir(parents=True)
    write_hf_directory(directory, tensors, adapter.export_config(model_cfg, cfg.train.seq_len),
                       cached_tokenizer(cache), torch.float32)
    return directory


def train_check(run_dir: Path, cache: Path, *overrides: str, summary: bool = False,
                config: Path | None = None) -> tuple[str, dict]:
    body = "train_summary" if summary else "train_losses"
    return (f"tests.distributed.runs:{body}", {"run_dir": str(run_dir), "cache": str(cache),
                                                "overrides": list(overrides), "config": str(config or "")})


# The run-level negative controls' perturbation: the learning rate off by this factor moves the
# tiny configs' losses by 2.5e-5 (LLM, any layout), 2.6e-5 (MoE), 7.9e-5 (DeltaNet), 2.3e-5 (MatFormer
# joint, test_matformer_runs' 6 steps) relative at most, 2.3-8x RTOL. 1 + 3e-4 gave the LLM 1.5e-5 (too close to call), 1 + 1e-4 stayed within RTOL.
LR_PERTURBATION = 1 + 5e-4


def perturbed_lr(config: Path = TINY) -> str:
    """The override that multiplies `config`'s learning rate by LR_PERTURBATION."""
    from launcher.config import load_config

    return f"train.lr={load_config(config).train.lr * LR_PERTURBATION!r}"


def assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) and len(want) > 0
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert abs(g - w) <= RTOL * abs(w), f"step {step}: {g} vs {w} (relative {abs(g - w) / abs(w):.2e})"


def assert_same_eval(got: dict[str, float], want: dict[str, float]) -> None:
    """Two eval records (name -> value) have the same metrics, each within RTOL."""
    assert got.keys() == want.keys() and want
    for name, value in want.items():
        assert abs(got[name] - value) <= RTOL * abs(value), f"{name}: {got[name]} vs {value}"


def assert_losses_differ(got: list[float], want: list[float]) -> None:
    """Negative control of a parity test: a run perturbed on purpose fails assert_same_losses (all
    its steps ran, and at least one is off by more than RTOL)."""
    assert len(got) == len(want) > 0
    try:
        assert_same_losses(got, want)
    except AssertionError:
        return
    raise AssertionError(f"the perturbed run is within relative {RTOL} of the reference at every step: {got} vs {want}")
