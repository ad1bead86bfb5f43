"""Tensor (+ sequence) parallelism: module-level parity with one device (and the placement of
every parameter), run-level parity (with selective activation checkpointing too), and checkpoints
resharded between tp layouts."""
import copy
from pathlib import Path

import pytest

from tests.distributed.harness import run_world
from tests.distributed.runs import assert_losses_differ, assert_same_losses, hf_directory, perturbed_lr, train_check
from tests.distributed.sharding import assert_placed, llm_plan

THIS = "tests.distributed.test_tensor_parallel"
RTOL = 1e-5  # module-level parity, fp32
MODULES = ("tok_embeddings", "attention", "feed_forward", "output")


def model_parity(n_kv_heads: int, sequence_parallel: bool, perturb: float = 0.0) -> dict:
    """Check body: the whole-world-TP'd LLM vs the same model on one device (fp32).

    Returns "errors": the max relative error of every captured module output (embedding, each
    block's attention and MLP, the vocab-parallel head), of the loss-parallel cross entropy, and of
    every parameter gradient; and "placements": each parameter's (mesh dim names, placements) if it
    is a DTensor, else None. `perturb` is the negative control: the last tp rank's shard of layer
    0's wq scaled by 1 + perturb after sharding.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    from models.common.loss import cross_entropy_sum
    from models.llm.model import LLMConfig, Transformer
    from models.llm.parallelize import apply_tensor_parallel
    from parallel.options import ParallelizeOptions
    from parallel.init import init_parameters
    from parallel.mesh import ParallelDims
    from tests.distributed.sharding import placements, scale_last_shard

    tp = dist.get_world_size()
    cfg = LLMConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=n_kv_heads, vocab_size=128, multiple_of=16)
    reference = Transformer(cfg)
    init_parameters(reference, seed=3)
    sharded = copy.deepcopy(reference)
    meshes = ParallelDims.resolve(tp=tp, dp_shard=1, world_size=tp).build_mesh("cpu")
    apply_tensor_parallel(sharded, meshes, ParallelizeOptions(sequence_parallel=sequence_parallel))
    if perturb:
        scale_last_shard(sharded.layers["0"].attention.wq.weight, 1 + perturb)

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=generator)
    targets = torch.randint(0, cfg.vocab_size, (2, 16), generator=generator)

    def capture(model):
        outputs = {}
        for name, module in model.named_modules():
            if name.split(".")[-1] in MODULES:
                module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        return outputs

    want, got = capture(reference), capture(sharded)
    ref_loss = cross_entropy_sum(reference(tokens), targets)
    (ref_loss / targets.numel()).backward()
    with loss_parallel():
        loss = cross_entropy_sum(sharded(tokens), targets)
        (loss / targets.numel()).backward()

    def whole(tensor):
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def whole_activation(tensor):
        if not isinstance(tensor, DTensor) and tensor.shape[1] != tokens.shape[1]:  # a local sequence shard
            return DTensor.from_local(tensor, meshes.tp, [Shard(1)]).full_tensor()
        return whole(tensor)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    errors = {f"out:{name}": rel(whole_activation(got[name]), want[name]) for name in want}
    errors["loss"] = rel(whole(loss), ref_loss)
    ref_params = dict(reference.named_parameters())
    for name, param in sharded.named_parameters():
        errors[f"grad:{name}"] = rel(whole(param.grad), ref_params[name].grad)
        assert whole(param).shape == ref_params[name].shape
    assert len(errors) > 4 + 2 * len(MODULES)
    return {"errors": errors, "placements": placements(sharded)}


def _parity_cases(kv_heads: tuple[int, ...]) -> list[dict]:
    return [{"n_kv_heads": kv, "sequence_parallel": sp} for kv in kv_heads for sp in (True, False)]


TP2_CASES, TP4_CASES = _parity_cases((8, 4, 1)), _parity_cases((8, 2, 1))
# Negative control: one rank's shard of layer 0's wq off by 3e-5 (relative), the smallest step of
# 1e-5, 2e-5, 3e-5 that the parity tolerance rejects with a margin (1e-5 gave 1.0e-5).
PERTURBED_CASE = {"n_kv_heads": 8, "sequence_parallel": True, "perturb": 3e-5}


def _parity_checks(cases: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{THIS}:model_parity", case) for case in cases]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tp-runs")


STOP = "run.stop_at_step=5"
MQA = "model.n_kv_heads=1"  # fewer kv heads than tp ranks: replicated


@pytest.fixture(scope="module")
def tp2_world(runs_dir, data_cache):
    def run(name, run_dir, *overrides):
        return train_check(runs_dir / run_dir, data_cache, *overrides), name
    runs = [
        (train_check(runs_dir / "tp2", data_cache, "parallel.tp=2", summary=True), "tp2_recorded"),
        run("tp2_lr_perturbed", "tp2_lr_perturbed", "parallel.tp=2", perturbed_lr()),
        run("tp2_ac_selective", "tp2_ac_selective", "parallel.tp=2", "train.activation_checkpoint=selective"),
        (train_check(runs_dir / "tp2_no_sp", data_cache, "parallel.tp=2", "parallel.sequence_parallel=false",
                     "parallel.loss_parallel=false", summary=True), "tp2_no_sp_recorded"),
        run("tp2_mqa", "tp2_mqa", "parallel.tp=2", MQA),
        run("tp2_stop", "tp2_to_tp1", "parallel.tp=2", STOP),
        run("tp2_stop_for_4", "tp2_to_tp2dp2", "parallel.tp=2", STOP),
        run("tp2_init_from", "tp2_init_from", "parallel.tp=2",
            f"checkpoint.init_from={hf_directory(runs_dir / 'hf', data_cache)}"),
    ]
    results = iter(r.value() for r in run_world(2, _parity_checks(TP2_CASES + [PERTURBED_CASE]) + [c for c, _ in runs],
                                                runs_dir / "world2"))
    parity, perturbed = [next(results) for _ in TP2_CASES], next(results)
    done = {name: next(results) for _, name in runs}
    for name in ("tp2", "tp2_no_sp"):  # the recorded runs: their losses, and how parallelize left the model
        record = done.pop(f"{name}_recorded")
        done[name], done[f"{name}_layout"] = record["losses"], record["layout"]
    return {"parity": parity, "perturbed": perturbed, "runs": done}


@pytest.fixture(scope="module")
def tp4_world(runs_dir, data_cache, tp2_world):
    def run(run_dir, *overrides):
        return train_check(runs_dir / run_dir, data_cache, *overrides)
    runs = {
        "tp2_dp2": run("tp2_dp2", "parallel.tp=2", "train.micro_batch_size=4"),
        "tp2_hsdp": run("tp2_hsdp", "parallel.tp=2", "parallel.dp_replicate=2", "train.micro_batch_size=2"),
        "tp2_dp2_resumed": run("tp2_to_tp2dp2", "parallel.tp=2", "train.micro_batch_size=4"),
        "tp2dp2_stop": run("tp2dp2_to_tp2", "parallel.tp=2", "train.micro_batch_size=4", STOP),
        "tp2_dp2_mqa": run("tp2_dp2_mqa", "parallel.tp=2", "train.micro_batch_size=4", MQA),
        "tp2_dp2_init_from": run("tp2_dp2_init_from", "parallel.tp=2", "train.micro_batch_size=4",
                                 f"checkpoint.init_from={runs_dir / 'hf'}"),  # written for the tp=2 world
        "tp2_dp2_init_native": run("tp2_dp2_init_native", "parallel.tp=2", "train.micro_batch_size=4",
                                   f"checkpoint.init_from={runs_dir / 'tp2_init_from'}"),
    }
    results = iter(r.value() for r in run_world(4, _parity_checks(TP4_CASES) + list(runs.values()),
                                                runs_dir / "world4"))
    return {"parity": [next(results) for _ in TP4_CASES], "runs": {name: next(results) for name in runs}}


@pytest.fixture(scope="module")
def after_four(runs_dir, data_cache, tp4_world):
    """Resumes that run after the 4-process world: tp=2 onto one process, tp2 x dp2 onto tp=2; and a one-process
    run started from the weights the tp=2 run from Hugging Face weights trained."""
    resumed, init_native = (r.value() for r in run_world(1, [
        train_check(runs_dir / "tp2_to_tp1", data_cache),
        train_check(runs_dir / "tp1_init_native", data_cache, f"checkpoint.init_from={runs_dir / 'tp2_init_from'}")],
        runs_dir / "world1"))
    two = run_world(2, [train_check(runs_dir / "tp2dp2_to_tp2", data_cache, "parallel.tp=2")],
                    runs_dir / "world2b")[0].value()
    return {"tp1_resumed": resumed, "tp2_resumed": two, "tp1_init_native": init_native}


def one_process_checks(workdir: Path, cache: Path) -> dict:
    return {"mqa": train_check(workdir / "mqa", cache, MQA),
            "init_from": train_check(workdir / "init_from", cache,
                                     f"checkpoint.init_from={hf_directory(workdir / 'hf', cache)}")}


def _beyond_tolerance(errors: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in errors.items() if not v <= RTOL}


@pytest.mark.parametrize("case", range(len(TP2_CASES)))
def test_tp2_module_parity(tp2_world, case):
    """tp=2, kv heads 8 (MHA), 4 (GQA) and 1 (MQA: kv heads replicated), with and without SP."""
    result = tp2_world["parity"][case]
    assert not _beyond_tolerance(result["errors"])
    assert_placed(result["placements"], llm_plan(2, **TP2_CASES[case]))


@pytest.mark.parametrize("case", range(len(TP4_CASES)))
def test_tp4_module_parity(tp4_world, case):
    """tp=4, kv heads 8 (MHA), 2 (GQA with kv heads replicated) and 1 (MQA), with and without SP."""
    result = tp4_world["parity"][case]
    assert not _beyond_tolerance(result["errors"])
    assert_placed(result["placements"], llm_plan(4, **TP4_CASES[case]))


def test_module_parity_negative_control(tp2_world):
    """Layer 0's wq off by 3e-5 on one rank's shard: wk's gradient, linear in the queries, is off by
    as much, and the parity tolerance rejects it."""
    bad = _beyond_tolerance(tp2_world["perturbed"]["errors"])
    assert "grad:layers.0.attention.wk.weight" in bad, tp2_world["perturbed"]["errors"]


@pytest.mark.parametrize("run", ["tp2", "tp2_no_sp"])
def test_tp2_run_matches_one_process(tp2_world, reference_losses, run):
    assert_same_losses(tp2_world["runs"][run], reference_losses)


# How the tiny LLM's parameters are placed after parallelize under tp=2 (runs.recording_layouts' record):
# rows / columns over tp, the norms' gains replicated over the sequence shards under SP and plain without it.
TP2_RUN_PLACEMENTS = {"tp2": ["('tp',) (Replicate(),)", "('tp',) (Shard(dim=0),)", "('tp',) (Shard(dim=1),)"],
                      "tp2_no_sp": ["('tp',) (Shard(dim=0),)", "('tp',) (Shard(dim=1),)", "plain"]}


@pytest.mark.parametrize("run", TP2_RUN_PLACEMENTS)
def test_tp2_runs_are_sharded_over_tp(tp2_world, run):
    """The runs the run-level parity tests compare were tensor-parallel: a tp=2 run whose model parallelize left
    whole (each rank training all of it on the same batch) would give the one-process losses too."""
    (layout,) = tp2_world["runs"][f"{run}_layout"]
    assert layout == {"placements": TP2_RUN_PLACEMENTS[run], "fsdp_units": 0, "ddp": False}


def test_perturbed_run_fails_the_comparison(tp2_world, reference_losses):
    """Negative control: tp=2 with the learning rate off by LR_PERTURBATION does not match."""
    assert_losses_differ(tp2_world["runs"]["tp2_lr_perturbed"], reference_losses)


def test_selective_checkpointing_under_tp_matches_plain_run(tp2_world):
    """The recompute policy sees DTensor ops: the saved matmul outputs are sharded, the recomputed
    norms run on sequence shards. Measured bitwise equal to the plain run."""
    assert_same_losses(tp2_world["runs"]["tp2_ac_selective"], tp2_world["runs"]["tp2"])


@pytest.mark.parametrize("run", ["tp2_dp2", "tp2_hsdp"])
def test_tp2_with_data_parallel_matches_one_process(tp4_world, reference_losses, run):
    assert_same_losses(tp4_world["runs"][run], reference_losses)


def test_tp2_checkpoint_resumes_on_tp1_and_tp2_dp2(tp2_world, tp4_world, after_four, reference_losses):
    ref = reference_losses
    assert_same_losses(tp2_world["runs"]["tp2_stop"], ref[:5])
    assert_same_losses(after_four["tp1_resumed"], ref[5:])
    assert_same_losses(tp2_world["runs"]["tp2_stop_for_4"], ref[:5])
    assert_same_losses(tp4_world["runs"]["tp2_dp2_resumed"], ref[5:])


def test_tp2_dp2_checkpoint_resumes_on_tp2(tp4_world, after_four, reference_losses):
    ref = reference_losses
    assert_same_losses(tp4_world["runs"]["tp2dp2_stop"], ref[:5])
    assert_same_losses(after_four["tp2_resumed"], ref[5:])


def test_replicated_kv_heads_match_one_process(tp2_world, tp4_world, one_process):
    """n_kv_heads=1 < tp=2: kv heads replicated, alone and with FSDP."""
    mqa = one_process["test_tensor_parallel:mqa"].value()
    assert_same_losses(tp2_world["runs"]["tp2_mqa"], mqa)
    assert_same_losses(tp4_world["runs"]["tp2_dp2_mqa"], mqa)


def test_runs_from_hugging_face_weights_match_one_process(tp2_world, tp4_world, one_process, reference_losses):
    """checkpoint.init_from loads into TP- and FSDP-sharded parameters as into whole ones (tp2, tp2 x dp2); the
    seeded run differs (the import took effect)."""
    from_hf = one_process["test_tensor_parallel:init_from"].value()
    assert_same_losses(tp2_world["runs"]["tp2_init_from"], from_hf)
    assert_same_losses(tp4_world["runs"]["tp2_dp2_init_from"], from_hf)
    assert_losses_differ(from_hf, reference_losses)


def test_tp2_dp2_run_from_a_tp2_checkpoints_weights_matches_one_process(tp2_world, tp4_world, after_four):
    """checkpoint.init_from a native run directory (its tp=2 checkpoint, resharded by DCP) at tp2 x dp2 and at one
    process; the runs start from the trained weights, not the ones that run started from (its losses differ)."""
    assert_same_losses(tp4_world["runs"]["tp2_dp2_init_native"], after_four["tp1_init_native"])
    assert_losses_differ(after_four["tp1_init_native"], tp2_world["runs"]["tp2_init_from"])
