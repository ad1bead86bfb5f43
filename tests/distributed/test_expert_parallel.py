"""Expert parallelism: the all-to-all round trip, one MoE layer at ep=2 and ep=4 against one
device (outputs, gradients, aux losses), and the tiny MoE config trained at ep=2, ep=2 x tp=2,
tp=2 alone, and under pipeline parallelism against one process.

The aux and z losses are functions of each forward's batch (all ranks of the batch group), so a
run equals one process only when its forwards see the same sequences: the references use the
micro-batch size that gives that."""
import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distributed.harness import run_world
from tests.distributed.hf_export import export_and_check
from tests.distributed.runs import SAMPLE, assert_losses_differ, assert_same_losses, perturbed_lr, train_check

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


def layer_parity(ep: int) -> dict[str, float]:
    """Check body: one MoE layer with its experts split over ep ranks vs the same layer on one device
    fed the tokens of all ranks of the ep group (fp64, dropless). Max relative errors."""
    import copy

    import torch
    import torch.distributed as dist

    from torch.distributed.tensor.parallel import parallelize_module

    from models.moe.model import MoE, MoEConfig
    from parallel.expert import ExpertParallel, SumOverGroup
    from parallel.mesh import ParallelDims

    world = dist.get_world_size()
    meshes = ParallelDims.resolve(dp_shard=world, ep=ep, world_size=world).build_mesh("cpu")
    group_ranks = meshes.ep.mesh.flatten().tolist()
    cfg = MoEConfig(dim=32, n_heads=4, vocab_size=64, n_experts=8, top_k=2, moe_hidden_dim=24, n_shared_experts=1,
                    aux_loss_coef=0.1, z_loss_coef=0.01)
    torch.manual_seed(0)
    reference = MoE(cfg).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
    layer = copy.deepcopy(reference)
    parallelize_module(layer.experts, meshes.ep, ExpertParallel())
    parallelize_module(layer.routing_statistics, meshes.ep, SumOverGroup())
    ep_group = meshes.ep.get_group()

    def data(r):
        g = torch.Generator().manual_seed(100 + r)
        n = 5 + 3 * r  # uneven token counts per rank
        return torch.randn(n, cfg.dim, generator=g, dtype=torch.float64), torch.randn(n, cfg.dim, generator=g,
                                                                                      dtype=torch.float64)
    inputs = {r: data(r) for r in group_ranks}
    rank = dist.get_rank()
    x, g = inputs[rank]
    out = layer(x)
    (out * g).sum().backward()  # + the aux and z shares, which the layer attached to its output
    want = reference(torch.cat([inputs[r][0] for r in group_ranks]))
    (want * torch.cat([inputs[r][1] for r in group_ranks])).sum().backward()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    start = sum(inputs[r][0].shape[0] for r in group_ranks[:group_ranks.index(rank)])
    errors = {"output": rel(out, want[start:start + x.shape[0]])}
    shares = torch.stack([layer.aux_share.detach(), layer.z_share.detach()])
    dist.all_reduce(shares, group=ep_group)
    errors["aux"], errors["z"] = rel(shares[0], reference.aux_share), rel(shares[1], reference.z_share)
    local = meshes.ep.get_local_rank()
    n_local = cfg.n_experts // ep
    for name in ("w1", "w2", "w3"):
        grad = getattr(layer.experts, name).grad.to_local()
        want = getattr(reference.experts, name).grad[local * n_local:(local + 1) * n_local]
        errors[f"experts.{name}"] = rel(grad, want)
    for name, p in layer.named_parameters():
        if "experts" not in name and p.requires_grad:  # router and shared expert: partial over ranks
            grad = p.grad.clone()
            dist.all_reduce(grad, group=ep_group)
            errors[name] = rel(grad, dict(reference.named_parameters())[name].grad)
    return errors


MICRO4 = "train.micro_batch_size=4"

# Mixtral's form: every layer MoE, renormalized top-k, no shared experts (the tiny config is Qwen2-MoE's).
MIXTRAL = ("model.n_dense_layers=0", "model.n_shared_experts=0", "model.renormalize=true")
# DeepSeek-V3-style routing: sigmoid scores, group-limited, a shared expert, aux-loss-free bias updates.
DEEPSEEK = ("model.router=sigmoid", "model.bias_update_rate=0.01", "model.n_groups=4", "model.topk_groups=2",
            "model.n_shared_experts=1")


REFERENCES = ("run", "deepseek", "micro4")


def one_process_checks(workdir: Path, cache: Path) -> dict:
    return {"run": train_check(workdir / "run", cache, config=MOE_TINY),
            "deepseek": train_check(workdir / "deepseek", cache, *DEEPSEEK, config=MOE_TINY),
            "micro4": train_check(workdir / "micro4", cache, MICRO4, *SAMPLE, config=MOE_TINY, summary=True)}


@pytest.fixture(scope="module")
def references(one_process) -> list:
    return [one_process[f"test_expert_parallel:{name}"] for name in REFERENCES]


@pytest.fixture(scope="module")
def moe_reference(references) -> list[float]:
    return references[0].value()


@pytest.fixture(scope="module")
def world4(tmp_path_factory, data_cache):
    workdir = tmp_path_factory.mktemp("ep-world4")
    checks = [(f"{THIS}:round_trip", {}), (f"{THIS}:layer_parity", {"ep": 2}), (f"{THIS}:layer_parity", {"ep": 4}),
              train_check(workdir / "ep2tp2", data_cache, "parallel.ep=2", "parallel.tp=2", "parallel.dp_shard=2",
                          MICRO4, config=MOE_TINY),
              train_check(workdir / "pp2ep2", data_cache, "parallel.pp=2", "parallel.ep=2", "parallel.dp_shard=2",
                          "train.micro_batch_size=2", config=MOE_TINY),
              # The other two Hugging Face forms, trained under ep2 x tp2 to be exported (see HF_FORMS).
              train_check(workdir / "ep2tp2_mixtral", data_cache, "parallel.ep=2", "parallel.tp=2",
                          "parallel.dp_shard=2", MICRO4, *MIXTRAL, config=MOE_TINY),
              train_check(workdir / "ep2tp2_glm4", data_cache, "parallel.ep=2", "parallel.tp=2", "parallel.dp_shard=2",
                          MICRO4, *DEEPSEEK, config=MOE_TINY)]
    return {**dict(enumerate(run_world(4, checks, workdir))), "dir": workdir}


def test_all_to_all_round_trip_is_identity(world4):
    assert all(world4[0].value(rank) for rank in range(4))


@pytest.mark.parametrize("index, ep", [(1, 2), (2, 4)])
def test_moe_layer_ep_matches_one_device(world4, index, ep):
    for rank in range(4):
        errors = world4[index].value(rank)
        assert max(errors.values()) < 1e-10, (ep, rank, errors)


@pytest.fixture(scope="module")
def world2(tmp_path_factory, data_cache):
    workdir = tmp_path_factory.mktemp("ep-world2")
    runs = {"ep2": ["parallel.ep=2", MICRO4],
            "ep2_lr_perturbed": ["parallel.ep=2", MICRO4, perturbed_lr(MOE_TINY)],
            "ep2_cp2_deepseek": ["parallel.ep=2", "parallel.cp=2", "parallel.dp_shard=1", *DEEPSEEK],
            "ep2_micro2": ["parallel.ep=2", "train.micro_batch_size=2"],
            "tp2": ["parallel.tp=2"],  # experts whole beside TP weights, no FSDP
            "pp2_1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b", MICRO4],
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


def test_tiny_moe_ep2_tp2_matches_one_process(world4, moe_reference):
    assert_same_losses(world4[3].value(), moe_reference)


# Runs of world4 exported to Hugging Face: run name -> (its index in world4, the class the export must be).
HF_FORMS = {"ep2tp2": (3, "Qwen2MoeForCausalLM"), "pp2ep2": (4, "Qwen2MoeForCausalLM"),
            "ep2tp2_mixtral": (5, "MixtralForCausalLM"), "ep2tp2_glm4": (6, "Glm4MoeForCausalLM")}


@pytest.mark.parametrize("run", HF_FORMS)
def test_hf_export_of_checkpoints_trained_under_ep_tp_pp_computes_their_logits(world4, tmp_path, run):
    """`convert to-hf` of the tiny MoE trained 10 steps at ep2 x tp2 x dp2 (each of the three HF forms) and at
    pp2 x ep2 x dp2 (experts sharded over ep, tp-sharded attention, stages): the exported tensors are the
    checkpoint's bit for bit, and transformers' class loaded from the export computes our logits."""
    index, architecture = HF_FORMS[run]
    assert world4[index].value()  # the run finished
    export_and_check(world4["dir"] / run, tmp_path / run)
    assert json.loads((tmp_path / run / "config.json").read_text())["architectures"] == [architecture]


def test_tiny_moe_tp2_without_fsdp_matches_one_process(world2, moe_reference):
    assert_same_losses(world2["tp2"].value(), moe_reference)


@pytest.mark.parametrize("run", ["pp2_1f1b", "pp2_zbv"])
def test_tiny_moe_pipeline_matches_one_process(world2, references, run):
    """Each stage's MoE layers attach their aux losses to their outputs: 1F1B and the split
    backward of zero-bubble V give one process's losses (same forward batches: micro-batch 4)."""
    assert_same_losses(world2[run].value()["losses"], references[2].value()["losses"])


@pytest.mark.parametrize("run", ["pp2_1f1b", "pp2_zbv"])
def test_tiny_moe_greedy_sample_through_the_pipeline_matches_one_process(world2, references, run):
    sample = world2[run].value()["sample"]
    assert sample and sample.startswith("The with statement") and sample == references[2].value()["sample"]


def test_tiny_moe_pp2_ep2_matches_ep2(world2, world4):
    """pp=2 x ep=2 x dp_shard=2 on four processes equals ep=2 x dp_shard=2 on two (same forwards)."""
    assert_same_losses(world4[4].value(), world2["ep2_micro2"].value())


def test_moe_metrics_under_pp_cover_every_stage(world2):
    """Per-layer loads come from the stage that holds the layer; the aux loss is their sum."""
    world2["pp2_1f1b"].value()
    records = [json.loads(line) for line in (world2["dir"] / "pp2_1f1b" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "moe_aux_loss" in r)
    assert {f"moe_load_max/{layer}" for layer in (1, 2, 3)} <= step.keys()  # layer 0 dense; 2, 3 on stage 1
    assert "moe_load_max/0" not in step
    assert step["moe_aux_loss"] > 0.01 * 3 * 0.99  # >= coef per MoE layer (its minimum), all three counted
