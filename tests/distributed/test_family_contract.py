"""The family contract from the trainer's side.

- A family defined only in the tests (tests/toy_family.py: a per-row model input, a per-row loss
  weight and a loss of its own) trains through the real trainer under dp2, tp2, cp2 and pp2 with the
  losses of one process: launcher/ and parallel/ were not changed for it.
- The trainer's first steps equal a plain PyTorch loop written here (same weights, batches and
  optimizer), so a trainer bug that would hit every layout alike cannot hide behind parity.
"""
import json
from pathlib import Path

import pytest

from tests.conftest import TINY, tiny_overrides
from tests.distributed.harness import run_world
from tests.distributed.runs import assert_losses_differ, assert_same_eval, assert_same_losses, perturbed_lr

THIS = "tests.distributed.test_family_contract"
TOY = "model.family=toy"
PLAIN_LOOP_RTOL = 1e-6


def train_toy(run_dir: str, cache: str, overrides: list[str]) -> dict:
    """Check body: a training run of the test-only family (registered in this process only)."""
    from launcher.config import load_config
    from launcher.trainer import train
    from models import register_family

    register_family("toy", "tests.toy_family")
    summary = train(load_config(TINY, tiny_overrides(Path(run_dir), Path(cache), TOY, "train.steps=5", *overrides)))
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    hook_calls = [r.get("after_backward_calls") for r in records if "loss" in r and "step" in r]
    return {"losses": summary["losses"], "eval": summary["eval"], "sample": summary["sample"],
            "after_backward_calls": hook_calls}


def toy_check(run_dir: Path, cache: Path, *overrides: str) -> tuple[str, dict]:
    return f"{THIS}:train_toy", {"run_dir": str(run_dir), "cache": str(cache), "overrides": list(overrides)}


def trainer_and_plain_loop(run_dir: str, cache: str) -> dict[str, list[float]]:
    """Check body (one process): 3 steps of the trainer and of a plain loop on the same weights and batches."""
    import torch
    import torch.nn.functional as F

    from data.build import build_loaders
    from launcher.config import load_config
    from launcher.trainer import train
    from models.llm.model import Transformer
    from parallel.init import init_parameters

    # Constant lr (warmup of one step reaches the peak at once), accumulation over 2 micro-batches, clipping on.
    cfg = load_config(TINY, tiny_overrides(Path(run_dir), Path(cache), "train.steps=3", "train.micro_batch_size=4",
                                           "train.lr_schedule=constant", "train.warmup_steps=1",
                                           "train.grad_clip=0.5"))
    trainer_losses = train(cfg)["losses"]

    t = cfg.train
    model = Transformer(cfg.model_config())
    init_parameters(model, t.seed)
    _, loader, _ = build_loaders(cfg.data, t.seq_len, t.global_batch_size, t.micro_batch_size, 0, 1, t.seed,
                                 log=lambda _: None)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": t.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}],
                                  lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    plain_losses = []
    for step in range(t.steps):
        micro_batches = loader.micro_batches(step)
        n_targets = sum(int(batch["targets"].numel()) for batch in micro_batches)
        total = 0.0
        for batch in micro_batches:
            loss = F.cross_entropy(model(batch["tokens"]).flatten(0, 1), batch["targets"].flatten(), reduction="sum")
            (loss / n_targets).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        plain_losses.append(total / n_targets)
    return {"trainer": trainer_losses, "plain": plain_losses}


def train_step_alone() -> dict[str, float]:
    """Check body (one process): a TrainStep built by hand around a tiny LLM. Two micro-batches through
    forward_backward give the mean token loss of both and its gradient; without backward, no gradient."""
    import torch
    import torch.nn.functional as F

    from launcher.config import TrainSection
    from launcher.optim import Optimizers
    from launcher.trainer import TrainStep
    from models import get_model_spec
    from models.llm.model import LLMConfig
    from parallel.context import SequenceLayout
    from parallel.init import init_parameters
    from parallel.mesh import ParallelDims

    spec = get_model_spec("llm")
    dims = ParallelDims.resolve(world_size=1)
    model = spec.model_cls(LLMConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16))
    init_parameters(model, seed=0)
    steps = TrainStep(spec, dims, dims.build_mesh("cpu"), SequenceLayout("zigzag", 1), torch.device("cpu"),
                      grad_clip=0.0, vocab_sharded_outputs=False)
    steps.bind([model], None, Optimizers([model], TrainSection()), torch.autocast("cpu", enabled=False))
    rows = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    rows[3, 5:] = 0
    batch = {"tokens": rows[:, :-1], "targets": rows[:, 1:].clone(), "positions": torch.arange(16).repeat(4, 1)}
    batch["targets"][3, 5:] = -100  # ignored targets leave the count
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]

    no_backward = steps.forward_backward(halves, backward=False)["loss"]
    untouched = all(p.grad is None for p in model.parameters())
    got = steps.forward_backward(halves, backward=True)["loss"]
    got_grad = model.output.weight.grad.clone()
    model.zero_grad()
    want = F.cross_entropy(model(batch["tokens"]).flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    want.backward()
    return {"untouched": float(untouched), "no_backward_rel": abs(no_backward - want.item()) / want.item(),
            "loss_rel": abs(got - want.item()) / want.item(),
            "grad_rel": float((got_grad - model.output.weight.grad).abs().max() / model.output.weight.grad.abs().max())}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("contract")


MICRO4 = "train.micro_batch_size=4"
TOY_LAYOUTS = {
    "dp2": [MICRO4],
    "tp2": ["parallel.tp=2", "parallel.dp_shard=1"],
    "cp2": ["parallel.cp=2", "parallel.dp_shard=1"],
    "pp2": ["parallel.pp=2", "parallel.dp_shard=1", MICRO4],
}


def one_process_checks(workdir: Path, cache: Path) -> dict:
    return {"toy": toy_check(workdir / "toy1", cache),
            "plain": (f"{THIS}:trainer_and_plain_loop", {"run_dir": str(workdir / "plain"), "cache": str(cache)}),
            "train_step": (f"{THIS}:train_step_alone", {})}


@pytest.fixture(scope="module")
def one(one_process) -> dict:
    return {name: one_process[f"test_family_contract:{name}"].value() for name in ("toy", "plain", "train_step")}


@pytest.fixture(scope="module")
def two(runs_dir, data_cache, one) -> dict:
    layouts = {**TOY_LAYOUTS, "dp2_lr_perturbed": [MICRO4, perturbed_lr()]}
    results = run_world(2, [toy_check(runs_dir / name, data_cache, *overrides) for name, overrides in layouts.items()],
                        runs_dir / "world2")
    return dict(zip(layouts, (r.value() for r in results)))


@pytest.mark.parametrize("layout", list(TOY_LAYOUTS))
def test_test_only_family_matches_one_process(one, two, layout):
    assert_same_losses(two[layout]["losses"], one["toy"]["losses"])
    assert one["toy"]["eval"].keys() == {"eval_loss", "eval_token_loss"}
    assert_same_eval(two[layout]["eval"], one["toy"]["eval"])


@pytest.mark.parametrize("layout", ["one", *TOY_LAYOUTS])
def test_the_after_backward_hook_runs_every_step_on_every_stage(one, two, layout):
    """The toy's after_backward hook reports 1 per model part; the trainer sums a hook's metrics over the pipeline
    stages, so every step's record holds 1 (2 under pp2: both stages). No family of models/ uses this hook: without
    this test a trainer that never called it passed every test."""
    run = one["toy"] if layout == "one" else two[layout]
    assert run["after_backward_calls"] == [2.0 if layout == "pp2" else 1.0] * len(run["losses"])


def test_test_only_family_loss_is_its_own(one):
    toy = one["toy"]
    assert len(toy["losses"]) == 5
    # Row weights are 1 or 2, so the weighted loss lies strictly between the token loss and twice it.
    eval_ = toy["eval"]
    assert eval_["eval_token_loss"] < eval_["eval_loss"] < 2 * eval_["eval_token_loss"]
    assert toy["sample"] is None  # the family declares no prompt batch: sampling is skipped with a line


def test_perturbed_run_fails_the_same_comparison(one, two):
    assert_losses_differ(two["dp2_lr_perturbed"]["losses"], one["toy"]["losses"])


def test_trainer_equals_a_plain_pytorch_loop(one):
    trainer, plain = one["plain"]["trainer"], one["plain"]["plain"]
    assert len(trainer) == len(plain) == 3
    for step, (a, b) in enumerate(zip(trainer, plain), start=1):
        assert abs(a - b) <= PLAIN_LOOP_RTOL * abs(b), f"step {step}: trainer {a} vs plain loop {b}"


def test_train_step_unit_normalizes_over_micro_batches(one):
    errors = one["train_step"]
    assert errors["untouched"] == 1.0  # forward_backward(backward=False) computes no gradient
    assert errors["no_backward_rel"] < 1e-6 and errors["loss_rel"] < 1e-6 and errors["grad_rel"] < 1e-5, errors
