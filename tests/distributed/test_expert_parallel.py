"""Expert parallelism and expert tensor parallelism: the all-to-all round trip; one MoE layer with its
experts split over ep (2, 4), over tp (2, 4; each expert's hidden units) and over ep2 x tp2 against one
device (outputs, gradients, aux losses, where each weight was placed) and a perturbed shard that the same
comparison rejects; the tiny MoE config trained at ep=2, ep=2 x tp=2, tp=2 alone, and under pipeline
parallelism against one process; a checkpoint written at ep2 x tp2 resumed on one process and one
written on one process resumed at ep2 x tp2.

The aux and z losses are functions of each forward's batch (all ranks of the batch group), so a
run equals one process only when its forwards see the same sequences: the references use the
micro-batch size that gives that."""
import json
from pathlib import Path

import pytest
from torch.distributed.tensor import Shard

from tests.conftest import REPO
from tests.distributed.harness import run_world
from tests.distributed.hf_export import export_and_check
from tests.distributed.runs import (SAMPLE, assert_losses_differ, assert_same_losses, assert_sharded_over, perturbed_lr,
                                    train_check)

THIS = "tests.distributed.test_expert_parallel"
MOE_TINY = REPO / "configs" / "moe" / "tiny.yaml"
RTOL = 1e-5


def round_trip() -> bool:
    """Check body: hash-valued rows with uneven splits go out and come back unchanged."""
    import torch
    import torch.distributed as dist

    from parallel.expert import all_to_all

    rank, world = dist.get_rank(), dist.get_world_size()
    send = [(3 * rank + 5 * dst) % 4 for dst in range(world)]  # rows to each rank, some zero
    recv = [(3 * src + 5 * rank) % 4 for src in range(world)]
    rows = torch.arange(sum(send), dtype=torch.float64)
    x = (rank * 1_000_003 + rows.unsqueeze(1) * 7919 + torch.arange(3)).requires_grad_()
    there = all_to_all(x, recv, send, dist.group.WORLD)
    expected = torch.cat([(src * 1_000_003 + (sum((3 * src + 5 * d) % 4 for d in range(rank)) + torch.arange(n))
                           .double().unsqueeze(1) * 7919 + torch.arange(3)) for src, n in enumerate(recv)])
    back = all_to_all(there, send, recv, dist.group.WORLD)
    back.sum().backward()
    return bool(torch.equal(there, expected) and torch.equal(back, x) and torch.equal(x.grad, torch.ones_like(x)))


def layer_parity(ep: int = 1, tp: int = 1, sequence_parallel: bool = True, perturb: bool = False) -> dict:
    """Check body: one MoE layer (routed experts, one shared expert) split the way a run splits it, experts
    over ep and each expert's hidden units over tp (the family's moe_plan and apply_experts),
    vs the same layer on one device fed the tokens of every rank of the batch group (fp64, dropless).
    Returns the max relative errors of the output, the aux and z losses, the input's and every parameter's
    gradient, and where each parameter was placed. `perturb` scales the last tp rank's shard of the experts'
    w1 by 1.001 first: the negative control (tp > 1, ep = 1)."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    from models.moe.model import MoE, MoEConfig
    from models.moe.parallelize import apply_experts, moe_plan
    from parallel.mesh import ParallelDims
    from tests.distributed.sharding import placements, scale_last_shard

    world = dist.get_world_size()
    dims = ParallelDims.resolve(dp_shard=world // tp, tp=tp, ep=ep, world_size=world)
    meshes = dims.build_mesh("cpu")
    batch_group, batch_ranks = meshes.batch.get_group(), dist.get_process_group_ranks(meshes.batch.get_group())
    cfg = MoEConfig(dim=32, n_heads=4, vocab_size=64, n_experts=8, top_k=2, moe_hidden_dim=24, n_shared_experts=1,
                    aux_loss_coef=0.1, z_loss_coef=0.01)
    torch.manual_seed(0)
    reference = MoE(cfg).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
    layer = copy.deepcopy(reference)
    if tp > 1:
        parallelize_module(layer, meshes.tp, moe_plan(layer, sequence_parallel))
    apply_experts(layer, dims, meshes)  # experts over ep and tp, routing statistics over the batch group
    if perturb:
        scale_last_shard(layer.experts.w1, 1.001)

    def data(index):  # one batch rank's tokens [1, n, d] and output gradient; uneven n, a multiple of tp
        g = torch.Generator().manual_seed(100 + index)
        n = tp * (2 + 3 * index)
        return (torch.randn(1, n, cfg.dim, generator=g, dtype=torch.float64),
                torch.randn(1, n, cfg.dim, generator=g, dtype=torch.float64))
    inputs = [data(i) for i in range(len(batch_ranks))]
    mine = batch_ranks.index(dist.get_rank())
    x, g = inputs[mine]
    if tp > 1 and sequence_parallel:  # the stream is sharded on the sequence over tp
        x, g = (t.chunk(tp, dim=1)[meshes.tp.get_local_rank()] for t in (x, g))
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * g).sum().backward()  # + the aux and z shares, which the layer attached to its output
    whole_input = torch.cat([x for x, _ in inputs], dim=1).requires_grad_()
    want = reference(whole_input)
    (want * torch.cat([g for _, g in inputs], dim=1)).sum().backward()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    def whole(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    start = sum(inputs[i][0].shape[1] for i in range(mine))
    if tp > 1 and sequence_parallel:
        start += meshes.tp.get_local_rank() * x.shape[1]
    errors = {"output": rel(out, want[:, start:start + x.shape[1]]),
              "input gradient": rel(x.grad, whole_input.grad[:, start:start + x.shape[1]])}
    shares = torch.stack([layer.aux_share.detach(), layer.z_share.detach()])
    dist.all_reduce(shares, group=batch_group)
    errors["aux"], errors["z"] = rel(shares[0], reference.aux_share), rel(shares[1], reference.z_share)
    reference_params = dict(reference.named_parameters())
    for name, p in layer.named_parameters():
        if not p.requires_grad:
            continue
        grad = whole(p.grad).clone()
        # Each rank's gradient covers its batch rank's tokens; routed experts under ep those of its whole ep group.
        experts_over_ep = ep > 1 and name.startswith("experts.")
        if not experts_over_ep or meshes.expert_fsdp.size() > 1:
            dist.all_reduce(grad, group=meshes.expert_fsdp.get_group() if experts_over_ep else batch_group)
        errors[name] = rel(grad, reference_params[name].grad)
    return {"errors": errors, "placements": placements(layer)}


MICRO4 = "train.micro_batch_size=4"

# Mixtral's form: every layer MoE, renormalized top-k, no shared experts (the tiny config is Qwen2-MoE's).
MIXTRAL = ("model.n_dense_layers=0", "model.n_shared_experts=0", "model.renormalize=true")
# DeepSeek-V3-style routing: sigmoid scores, group-limited, a shared expert, aux-loss-free bias updates.
DEEPSEEK = ("model.router=sigmoid", "model.bias_update_rate=0.01", "model.n_groups=4", "model.topk_groups=2",
            "model.n_shared_experts=1")


REFERENCES = ("run", "deepseek", "micro4", "deepseek_micro4")
STOP = "run.stop_at_step=5"  # the schedule still spans the run's 10 steps


def stopped_run(run_dir: str, cache: str, overrides: list[str], config: str) -> str:
    """Check body: a training run (stopped early, with a checkpoint); its directory, for a later world to resume."""
    from tests.distributed.runs import train_losses

    train_losses(run_dir, cache, overrides, config)
    return run_dir


def one_process_checks(workdir: Path, cache: Path) -> dict:
    return {"run": train_check(workdir / "run", cache, config=MOE_TINY),
            "deepseek": train_check(workdir / "deepseek", cache, *DEEPSEEK, config=MOE_TINY),
            "micro4": train_check(workdir / "micro4", cache, MICRO4, *SAMPLE, config=MOE_TINY, summary=True),
            "deepseek_micro4": train_check(workdir / "deepseek_micro4", cache, MICRO4, *DEEPSEEK, config=MOE_TINY),
            # Stopped at step 5, resumed at ep2 x tp2 in world4.
            "stop_for_ep2tp2": (f"{THIS}:stopped_run", train_check(workdir / "one_to_ep2tp2", cache, STOP,
                                                                   config=MOE_TINY)[1])}


@pytest.fixture(scope="module")
def references(one_process) -> list:
    return [one_process[f"test_expert_parallel:{name}"] for name in REFERENCES]


@pytest.fixture(scope="module")
def moe_reference(references) -> list[float]:
    return references[0].value()


EP2_TP2 = ("parallel.ep=2", "parallel.tp=2", "parallel.dp_shard=2", MICRO4)
# One MoE layer split over the 4 ranks (layer_parity's arguments) against one device.
LAYER_CASES = {"ep2": {"ep": 2}, "ep4": {"ep": 4}, "tp2": {"tp": 2}, "tp2_no_sp": {"tp": 2, "sequence_parallel": False},
               "tp4": {"tp": 4}, "ep2tp2": {"ep": 2, "tp": 2}}


@pytest.fixture(scope="module")
def world4(tmp_path_factory, data_cache, one_process):
    workdir = tmp_path_factory.mktemp("ep-world4")
    one_process_stop = one_process["test_expert_parallel:stop_for_ep2tp2"].value()
    checks = {"round_trip": (f"{THIS}:round_trip", {}),
              **{f"layer_{name}": (f"{THIS}:layer_parity", kwargs) for name, kwargs in LAYER_CASES.items()},
              "layer_tp2_perturbed": (f"{THIS}:layer_parity", {"tp": 2, "perturb": True}),
              "ep2tp2": train_check(workdir / "ep2tp2", data_cache, *EP2_TP2, config=MOE_TINY, summary=True),
              "pp2ep2": train_check(workdir / "pp2ep2", data_cache, "parallel.pp=2", "parallel.ep=2",
                                    "parallel.dp_shard=2", "train.micro_batch_size=2", config=MOE_TINY),
              # The other two Hugging Face forms, trained under ep2 x tp2 to be exported (see HF_FORMS).
              "ep2tp2_mixtral": train_check(workdir / "ep2tp2_mixtral", data_cache, *EP2_TP2, *MIXTRAL,
                                            config=MOE_TINY),
              "ep2tp2_glm4": train_check(workdir / "ep2tp2_glm4", data_cache, *EP2_TP2, *DEEPSEEK, config=MOE_TINY),
              # Stopped at step 5 here and resumed on one process (after_four); the one process's stop resumed here.
              "ep2tp2_stop": train_check(workdir / "ep2tp2_to_one", data_cache, *EP2_TP2, STOP, config=MOE_TINY),
              "one_to_ep2tp2": train_check(Path(one_process_stop), data_cache, *EP2_TP2, config=MOE_TINY)}
    return {**dict(zip(checks, run_world(4, list(checks.values()), workdir))), "dir": workdir}


@pytest.fixture(scope="module")
def after_four(world4, data_cache):
    """The ep2 x tp2 checkpoint of step 5 resumed on one process."""
    world4["ep2tp2_stop"].value()
    return run_world(1, [train_check(world4["dir"] / "ep2tp2_to_one", data_cache, config=MOE_TINY)],
                     world4["dir"] / "world1")[0]


def test_all_to_all_round_trip_is_identity(world4):
    assert all(world4["round_trip"].value(rank) for rank in range(4))


@pytest.mark.parametrize("case", LAYER_CASES)
def test_moe_layer_split_over_ep_and_tp_matches_one_device(world4, case):
    """Output, aux and z losses and every gradient within 1e-10 (fp64) on every rank, with each weight placed
    as the split says: routed experts on the expert dim over ep and on the hidden dim over tp (w1, w3 [E, d, h]
    on h; w2 [E, h, d] on h), the shared expert like a dense SwiGLU, the router plain (replicated)."""
    ep, tp = LAYER_CASES[case].get("ep", 1), LAYER_CASES[case].get("tp", 1)
    split = tuple(dim for dim, size in (("ep", ep), ("tp", tp)) if size > 1)
    want = {"router.gate.weight": None, "router.expert_bias": None,
            **{f"experts.{name}": (split, tuple(Shard(0) if dim == "ep" else Shard(hidden) for dim in split))
               for name, hidden in (("w1", 2), ("w3", 2), ("w2", 1))},
            **{f"shared.{name}.weight": (("tp",), (placement,)) if tp > 1 else None
               for name, placement in (("w1", Shard(0)), ("w3", Shard(0)), ("w2", Shard(1)))}}
    for rank in range(4):
        result = world4[f"layer_{case}"].value(rank)
        assert result["placements"] == want, (rank, result["placements"])
        assert max(result["errors"].values()) < 1e-10, (case, rank, result["errors"])


def test_perturbed_expert_shard_fails_the_layer_comparison(world4):
    """Negative control: the last tp rank's shard of the experts' w1 scaled by 1.001 moves the output and the
    gradients far beyond the tolerance."""
    for rank in range(4):
        errors = world4["layer_tp2_perturbed"].value(rank)["errors"]
        assert errors["output"] > 1e-5 and errors["experts.w1"] > 1e-5, (rank, errors)


@pytest.fixture(scope="module")
def world2(tmp_path_factory, data_cache):
    workdir = tmp_path_factory.mktemp("ep-world2")
    runs = {"ep2": ["parallel.ep=2", MICRO4],
            "ep2_lr_perturbed": ["parallel.ep=2", MICRO4, perturbed_lr(MOE_TINY)],
            "ep2_cp2_deepseek": ["parallel.ep=2", "parallel.cp=2", "parallel.dp_shard=1", *DEEPSEEK],
            "ep2_micro2": ["parallel.ep=2", "train.micro_batch_size=2"],
            "tp2": ["parallel.tp=2"],  # experts split over tp (expert TP) beside the router's plain weights, no FSDP
            "pp2_1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b", MICRO4],
            # bias updates read the step's routing statistics, which the pipeline's first-step metadata-inference
            # forward must not reach
            "pp2_1f1b_deepseek": ["parallel.pp=2", "parallel.pp_schedule=1f1b", MICRO4, *DEEPSEEK],
            "pp2_zbv": ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=2", MICRO4]}
    sampled = {"pp2_1f1b", "pp2_zbv"}  # greedy sampling through MoE pipeline stages
    results = run_world(2, [train_check(workdir / name, data_cache, *overrides,
                                        *(SAMPLE if name in sampled else ()), config=MOE_TINY, summary=name in sampled)
                            for name, overrides in runs.items()], workdir)
    return {**dict(zip(runs, results)), "dir": workdir}


def test_tiny_moe_ep2_matches_one_process(world2, references):
    """ep=2 over dp_shard=2 (softmax router), and ep=2 over cp=2 with the DeepSeek-style router."""
    assert_same_losses(world2["ep2"].value(), references[0].value())
    assert_same_losses(world2["ep2_cp2_deepseek"].value(), references[1].value())


def test_perturbed_run_fails_the_comparison(world2, references):
    """Negative control: ep=2 with the learning rate off by LR_PERTURBATION does not match."""
    assert_losses_differ(world2["ep2_lr_perturbed"].value(), references[0].value())


def test_tiny_moe_ep2_tp2_matches_one_process(world4, references):
    """Experts over ep and their hidden units over tp: the tiny config (softmax router) and the DeepSeek-style one
    (sigmoid router, a shared expert split over tp, bias updates)."""
    assert_same_losses(world4["ep2tp2"].value()["losses"], references[0].value())
    assert_sharded_over(world4["ep2tp2"].value()["layout"], "ep", "tp")
    assert_same_losses(world4["ep2tp2_glm4"].value(), references[1].value())


def test_ep2_tp2_checkpoint_resumes_on_one_process_and_back(world4, after_four, moe_reference):
    """Step 5's checkpoint written at ep2 x tp2 resumed on one process, and one written on one process resumed at
    ep2 x tp2: both continue with the uninterrupted run's losses (expert weights and Adam moments resharded)."""
    assert_same_losses(after_four.value(), moe_reference[5:])
    assert_same_losses(world4["one_to_ep2tp2"].value(), moe_reference[5:])


# Runs of world4 exported to Hugging Face: run name -> the class the export must be.
HF_FORMS = {"ep2tp2": "Qwen2MoeForCausalLM", "pp2ep2": "Qwen2MoeForCausalLM",
            "ep2tp2_mixtral": "MixtralForCausalLM", "ep2tp2_glm4": "Glm4MoeForCausalLM"}


@pytest.mark.parametrize("run", HF_FORMS)
def test_hf_export_of_checkpoints_trained_under_ep_tp_pp_computes_their_logits(world4, tmp_path, run):
    """`convert to-hf` of the tiny MoE trained 10 steps at ep2 x tp2 x dp2 (each of the three HF forms) and at
    pp2 x ep2 x dp2 (experts sharded over ep, tp-sharded attention, stages): the exported tensors are the
    checkpoint's bit for bit, and transformers' class loaded from the export computes our logits."""
    architecture = HF_FORMS[run]
    assert world4[run].value()  # the run finished
    export_and_check(world4["dir"] / run, tmp_path / run)
    assert json.loads((tmp_path / run / "config.json").read_text())["architectures"] == [architecture]


def test_tiny_moe_tp2_without_fsdp_matches_one_process(world2, moe_reference):
    assert_same_losses(world2["tp2"].value(), moe_reference)


@pytest.mark.parametrize("run", ["pp2_1f1b", "pp2_zbv"])
def test_tiny_moe_pipeline_matches_one_process(world2, references, run):
    """Each stage's MoE layers attach their aux losses to their outputs: 1F1B and the split
    backward of zero-bubble V give one process's losses (same forward batches: micro-batch 4)."""
    assert_same_losses(world2[run].value()["losses"], references[2].value()["losses"])


def test_pipeline_bias_updates_see_only_the_steps_forwards(world2, references):
    """Aux-loss-free balancing moves the selection biases by the step's loads: under pp they must be the
    micro-batches' alone (torch's first-step metadata-inference forward on placeholders made them NaN and off)."""
    assert_same_losses(world2["pp2_1f1b_deepseek"].value(), references[3].value())


@pytest.mark.parametrize("run", ["pp2_1f1b", "pp2_zbv"])
def test_tiny_moe_greedy_sample_through_the_pipeline_matches_one_process(world2, references, run):
    sample = world2[run].value()["sample"]
    assert sample and sample.startswith("The with statement") and sample == references[2].value()["sample"]


def test_tiny_moe_pp2_ep2_matches_ep2(world2, world4):
    """pp=2 x ep=2 x dp_shard=2 on four processes equals ep=2 x dp_shard=2 on two (same forwards)."""
    assert_same_losses(world4["pp2ep2"].value(), world2["ep2_micro2"].value())


def test_moe_metrics_under_pp_cover_every_stage(world2):
    """Per-layer loads come from the stage that holds the layer; the aux loss is their sum."""
    world2["pp2_1f1b"].value()
    records = [json.loads(line) for line in (world2["dir"] / "pp2_1f1b" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "moe_aux_loss" in r)
    assert {f"moe_load_max/{layer}" for layer in (1, 2, 3)} <= step.keys()  # layer 0 dense; 2, 3 on stage 1
    assert "moe_load_max/0" not in step
    assert step["step"] == 1  # the first step too: the pipeline's metadata-inference forward is not counted in it
    assert step["moe_aux_loss"] > 0.01 * 3 * 0.99  # >= coef per MoE layer (its minimum), all three counted
