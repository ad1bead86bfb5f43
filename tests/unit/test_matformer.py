"""MatFormer on one process (fp64, tiny): every submodel is the dense `llm` made of its prefix weights, rows
of different submodels in one batch are independent, the joint loss and gradient are the weighted sums of the
granularities', the sampled draw is a layout-free function of (seed, step, micro-batch), the per-submodel
metrics are each submodel's mean token loss, and flops_per_token is exact against FlopCounterMode. Each
comparison has a negative control that the same assertion rejects."""
import dataclasses
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import models.matformer.training as training
from data.loader import GlobalBatchLoader
from launcher.metrics import training_flops
from models import configured_spec
from models.common.loss import IGNORE_INDEX
from models.common.text import TEXT_DATA, attention_pairs
from models.llm.model import LLMConfig, Transformer, flops_per_attention_pair
from models.matformer.model import MatFormer, MatFormerConfig, flops_per_token
from models.matformer.training import SubmodelLoader, sampled_granularity
from parallel.init import init_parameters
from tests.unit.test_data import NumberedSamples
from tests.unit.test_flops import _causal, _in_modules

aten = torch.ops.aten
VOCAB, ROWS, SEQ = 64, 3, 9
# FFN hidden size 96 (dim 32, multiple_of 16): granularities of 24, 48 and 96 units.
CFG = MatFormerConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16,
                      granularities=[0.25, 0.5, 1.0], weights=[1.0, 2.0, 0.5], mix_n_match=[[0.25, 1.0, 0.5]])
SAMPLED = dataclasses.replace(CFG, mode="sampled")
TOL = dict(rtol=1e-12, atol=1e-12)


def matformer(seed: int = 0) -> MatFormer:
    model = MatFormer(CFG).double()
    init_parameters(model, seed)
    return model


def widths_of(fractions: list[float]) -> list[int]:
    return [CFG.units(f) for f in fractions]


def dense(model: MatFormer, widths: list[int], prefix=lambda t, k, dim: t.narrow(dim, 0, k)) -> Transformer:
    """The dense `llm` whose layer l's FFN is `prefix` (default: the first widths[l] hidden units) of the
    MatFormer's; every other weight as is."""
    fields = {f.name: getattr(CFG, f.name) for f in dataclasses.fields(LLMConfig)}
    llm = Transformer(LLMConfig(**{**fields, "ffn_hidden_dims": widths})).double()
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")  # layers.<l>.feed_forward.<w1|w2|w3>.weight
        if parts[2:3] == ["feed_forward"]:  # hidden units are w2's columns, w1's and w3's rows
            tensor = prefix(tensor, widths[int(parts[1])], 1 if parts[3] == "w2" else 0)
        state[name] = tensor
    llm.load_state_dict(state)
    return llm


def suffix(t: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The wrong prefix: the last k hidden units."""
    return t.narrow(dim, t.shape[dim] - k, k)


def text_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """ROWS rows of tokens and targets (a few targets ignored, so the mean is over fewer tokens than the
    batch holds) and positions, as the text loaders serve them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    targets[0, :4] = IGNORE_INDEX
    return {"tokens": tokens, "targets": targets, "positions": torch.arange(SEQ).repeat(ROWS, 1)}


def run_rows(model, tokens: torch.Tensor, widths: list[int]) -> torch.Tensor:
    return model(tokens, ffn_widths=torch.tensor([widths] * tokens.shape[0]))


def assert_differs(got: torch.Tensor, want: torch.Tensor) -> None:
    """Negative control: the comparison that passes above fails here."""
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, want, **TOL)


# ------------------------------------------------------------------------------ submodels are dense LLMs


@pytest.mark.parametrize("fraction", CFG.granularities)
def test_granularity_is_the_dense_llm_of_its_prefix_weights(fraction):
    model, tokens = matformer(), text_batch()["tokens"]
    widths = widths_of([fraction] * CFG.n_layers)
    torch.testing.assert_close(run_rows(model, tokens, widths), dense(model, widths)(tokens), **TOL)
    if fraction < 1:  # the full width has no other prefix
        assert_differs(run_rows(model, tokens, widths), dense(model, widths, prefix=suffix)(tokens))


def test_full_granularity_is_the_llm_with_the_same_weights():
    model, tokens = matformer(), text_batch()["tokens"]
    fields = {f.name: getattr(CFG, f.name) for f in dataclasses.fields(LLMConfig)}
    llm = Transformer(LLMConfig(**fields)).double()
    llm.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(tokens), llm(tokens), **TOL)  # no ffn_widths: the full model
    torch.testing.assert_close(run_rows(model, tokens, [96] * CFG.n_layers), llm(tokens), **TOL)
    with torch.no_grad():
        llm.layers["1"].feed_forward.w2.weight[0, -1] += 1e-3  # a unit only the full width uses
    assert_differs(model(tokens), llm(tokens))


def test_mix_n_match_is_the_dense_llm_of_its_per_layer_prefixes():
    model, tokens = matformer(), text_batch()["tokens"]
    name, widths = CFG.submodels()[-1]
    assert (name, widths) == ("mix0", [24, 96, 48])
    torch.testing.assert_close(run_rows(model, tokens, widths), dense(model, widths)(tokens), **TOL)
    assert_differs(run_rows(model, tokens, widths), dense(model, widths[::-1])(tokens))


def test_uniform_mix_n_match_is_that_granularity():
    cfg = dataclasses.replace(CFG, mix_n_match=[[0.5] * CFG.n_layers])
    submodels = dict(cfg.submodels())
    assert submodels["mix0"] == submodels["g0.5"] == [48] * CFG.n_layers
    model, tokens = matformer(), text_batch()["tokens"]
    torch.testing.assert_close(run_rows(model, tokens, submodels["mix0"]), dense(model, [48] * 3)(tokens), **TOL)
    assert_differs(run_rows(model, tokens, submodels["mix0"]), dense(model, [24] * 3)(tokens))


def test_rows_of_different_submodels_equal_each_group_alone():
    """Runs of rows (one submodel again after another) in one batch, against each row group on its own."""
    model = matformer()
    tokens = torch.randint(0, VOCAB, (5, SEQ), generator=torch.Generator().manual_seed(1))
    rows = [[24] * 3, [24] * 3, [96, 48, 24], [96, 48, 24], [24] * 3]
    mixed = model(tokens, ffn_widths=torch.tensor(rows))
    for group in ([0, 1, 4], [2, 3]):
        torch.testing.assert_close(mixed[group], run_rows(model, tokens[group], rows[group[0]]), **TOL)
    assert_differs(mixed[[2, 3]], run_rows(model, tokens[[2, 3]], rows[0]))


# ------------------------------------------------------------------------------ loss, gradient, metrics


class OneBatch:
    """A stand-in text loader that serves the same micro-batch at every step."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        return [self.batch]


def spec_loss(model, cfg: MatFormerConfig, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The loss the trainer takes of a single micro-batch (the configured LossSpec's sum over its count), and
    the metrics in the same units."""
    loss_spec = configured_spec("matformer", cfg).loss
    logits = model(batch["tokens"], batch["positions"], ffn_widths=batch["ffn_widths"])
    terms, count = loss_spec.compute(logits, batch), loss_spec.count(batch)
    return terms.loss_sum / count, {name: value / count for name, value in terms.metrics.items()}


def mean_loss(model, batch: dict[str, torch.Tensor], widths: list[int]) -> torch.Tensor:
    """The mean token loss of the batch run alone by one submodel."""
    logits = run_rows(model, batch["tokens"], widths)
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX)


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_joint_loss_and_gradient_are_the_weighted_sums_over_granularities():
    model, batch = matformer(), text_batch()
    (joint,) = SubmodelLoader(OneBatch(batch), CFG, seed=0, training=True).micro_batches(0)
    assert joint["tokens"].shape[0] == ROWS * len(CFG.granularities)
    loss, _ = spec_loss(model, CFG, joint)
    loss.backward()
    got = gradients(model)

    submodels = dict(CFG.submodels())
    want_loss, want = 0.0, {}
    for w, fraction in zip(CFG.weights, CFG.granularities):
        single = mean_loss(model, batch, submodels[f"g{fraction:g}"])
        single.backward()
        want_loss = want_loss + w * single.detach()
        for name, grad in gradients(model).items():
            want[name] = want.get(name, 0) + w * grad
    torch.testing.assert_close(loss.detach(), want_loss, **TOL)
    torch.testing.assert_close(got, want, **TOL)
    unweighted = SubmodelLoader(OneBatch(batch), dataclasses.replace(CFG, weights=[]), 0, True).micro_batches(0)[0]
    spec_loss(model, CFG, unweighted)[0].backward()
    assert_differs(gradients(model)["layers.0.feed_forward.w1.weight"], want["layers.0.feed_forward.w1.weight"])


@pytest.mark.parametrize("cfg", [CFG, SAMPLED], ids=["joint", "sampled"])
def test_eval_metrics_are_each_submodels_mean_loss(cfg):
    """eval loss_<name> = the submodel's mean token loss; the eval loss is the training objective
    (joint: sum_i w_i L_i; sampled: its expectation, sum_i w_i L_i / sum_i w_i)."""
    model, batch = matformer(), text_batch()
    (evaluated,) = SubmodelLoader(OneBatch(batch), cfg, seed=0, training=False).micro_batches(0)
    with torch.no_grad():
        loss, metrics = spec_loss(model, cfg, evaluated)
        means = {name: mean_loss(model, batch, widths) for name, widths in cfg.submodels()}
    assert set(metrics) == {f"loss_{name}" for name in means} == {"loss_g0.25", "loss_g0.5", "loss_g1", "loss_mix0"}
    # Training reports the granularities only when every step runs them all (joint); evaluation reports the rest.
    reported = configured_spec("matformer", cfg).loss
    trained = ("loss_g0.25", "loss_g0.5", "loss_g1") if cfg.mode == "joint" else ()
    assert reported.metrics == trained and set(reported.metrics + reported.eval_metrics) == set(metrics)
    for name, mean in means.items():
        torch.testing.assert_close(metrics[f"loss_{name}"], mean, **TOL)
    assert_differs(metrics["loss_g0.25"], means["g0.5"])
    objective = sum(w * means[f"g{f:g}"] for w, f in zip(cfg.weights, cfg.granularities))
    torch.testing.assert_close(loss, objective / (1 if cfg.mode == "joint" else sum(cfg.weights)), **TOL)


def test_sampled_micro_batch_loss_is_its_granularitys_mean_loss():
    model, batch = matformer(), text_batch()
    loader = SubmodelLoader(OneBatch(batch), SAMPLED, seed=0, training=True)
    (sampled,) = loader.micro_batches(5)
    chosen = sampled_granularity(0, 5, 0, SAMPLED.weights)
    widths = SAMPLED.submodels()[chosen][1]
    assert sampled["tokens"].shape[0] == ROWS and sampled["ffn_widths"].tolist() == [widths] * ROWS
    with torch.no_grad():
        torch.testing.assert_close(spec_loss(model, SAMPLED, sampled)[0], mean_loss(model, batch, widths), **TOL)


# ------------------------------------------------------------------------------ the sampled draw


DRAWS = 20000


def assert_frequencies(draws: list[int], weights: list[float]) -> None:
    """Each granularity's share of the draws is within 5 standard deviations of weight_i / sum(weights)."""
    for i, w in enumerate(weights):
        p = w / sum(weights)
        share = draws.count(i) / len(draws)
        assert abs(share - p) <= 5 * (p * (1 - p) / len(draws)) ** 0.5 + 1e-12, (i, share, p)


def test_sampled_draw_follows_the_weights():
    weights = [1.0, 0.0, 2.0, 5.0]
    draws = [sampled_granularity(3, step, k, weights) for step in range(DRAWS // 4) for k in range(4)]
    assert_frequencies(draws, weights)
    with pytest.raises(AssertionError):
        assert_frequencies(draws, [1.0, 1.0, 1.0, 1.0])


def test_sampled_draw_is_a_function_of_seed_step_and_micro_batch():
    draws = [[sampled_granularity(seed, step, k, [1.0, 1.0, 1.0]) for step in range(8) for k in range(4)]
             for seed in (0, 0, 1)]
    assert draws[0] == draws[1] and draws[0] != draws[2]


def submodel_loaders(monkeypatch, dp_size: int, micro_batch_size: int) -> list[SubmodelLoader]:
    """The sampled training loader of each dp rank, built by the family's build_loaders over numbered
    samples (a row's first token says which sample it is)."""
    def numbered(data_cfg, seq_len, gbs, mbs, dp_rank, dp, seed, log=print):
        loader = GlobalBatchLoader(NumberedSamples(64), gbs, mbs, dp_rank, dp, seed)
        return None, loader, loader

    monkeypatch.setattr(training, "TEXT_DATA", dataclasses.replace(TEXT_DATA, build_loaders=numbered))
    build = configured_spec("matformer", SAMPLED).data.build_loaders
    return [build(None, 4, 16, micro_batch_size, rank, dp_size, seed=7)[1] for rank in range(dp_size)]


def widths_by_sample(loaders: list[SubmodelLoader], step: int) -> dict[int, list[int]]:
    return {int(row[0]): widths for loader in loaders for batch in loader.micro_batches(step)
            for row, widths in zip(batch["tokens"], batch["ffn_widths"].tolist())}


def test_sampled_rows_run_the_same_granularity_at_dp2(monkeypatch):
    """One process (4 micro-batches of 4 rows) and dp=2 (2 each): every row runs the same submodel, as rank
    1's micro-batches are the global batch's 3rd and 4th."""
    one, two = submodel_loaders(monkeypatch, 1, 4), submodel_loaders(monkeypatch, 2, 4)
    steps = range(6)
    assert all(widths_by_sample(one, s) == widths_by_sample(two, s) for s in steps)
    assert len({tuple(w) for s in steps for w in widths_by_sample(one, s).values()}) > 1  # draws do vary
    # Control: rank 1 counting its micro-batches from 0 (a rank-local index) runs other submodels.
    two[1].first_micro_batch = 0
    assert any(widths_by_sample(one, s) != widths_by_sample(two, s) for s in steps)


# ------------------------------------------------------------------------------ FLOPs


def measured_model_flops(model, batch: dict[str, torch.Tensor], cfg: MatFormerConfig) -> Fraction:
    """Model FLOPs of one forward+backward of the batch through the configured loss, as FlopCounterMode
    measures them on the math SDPA backend: matmuls as run, attention causal ((T+1)/(2T) of the square)."""
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH):
        with forward:
            loss, _ = spec_loss(model, cfg, batch)
        with backward:
            loss.backward()
    by_module = forward.get_flop_counts()
    counts = by_module["Global"]
    assert set(counts) == {aten.mm, aten.bmm}, counts
    # Every matmul takes both gradients: the backward is 2x the forward, hence the 3x.
    assert backward.get_flop_counts()["Global"] == {op: 2 * flops for op, flops in counts.items()}
    attention = _in_modules(by_module, ".core_attention", aten.bmm)
    assert counts[aten.bmm] == attention
    return 3 * (counts[aten.mm] + _causal(attention, SEQ))


def trainer_flops(cfg: MatFormerConfig, batch: dict[str, torch.Tensor], pairs: int | None = None) -> float:
    """What the trainer counts for a step of one micro-batch (its ROWS rows of data)."""
    pairs = int(attention_pairs(batch)) if pairs is None else pairs
    return training_flops(flops_per_token(cfg, SEQ), flops_per_attention_pair(cfg), SEQ, ROWS, pairs)


def test_joint_flops_are_exact():
    model, batch = matformer(), text_batch()
    (joint,) = SubmodelLoader(OneBatch(batch), CFG, seed=0, training=True).micro_batches(0)
    measured = measured_model_flops(model, joint, CFG)
    assert trainer_flops(CFG, joint) == pytest.approx(float(measured), rel=1e-12, abs=0)
    # Control: without the pair correction (the joint batch's attention counted once per data row) the
    # count falls short.
    assert trainer_flops(CFG, joint, pairs=ROWS * SEQ * (SEQ + 1) // 2) != pytest.approx(float(measured), rel=1e-6)


def test_sampled_flops_are_the_expectation_over_the_draw():
    """flops_per_token in sampled mode: each granularity's measured step weighted by its probability."""
    model, batch = matformer(), text_batch()
    measured = []
    for i, (_, widths) in enumerate(SAMPLED.submodels()[:len(SAMPLED.granularities)]):
        single = training.with_submodels(batch, [(i, widths, 1.0, 1)])
        measured.append(measured_model_flops(model, single, SAMPLED))
        model.zero_grad()
        assert trainer_flops(SAMPLED, single) == trainer_flops(SAMPLED, batch)  # the draw does not change the count
    expected = sum(Fraction(w) * m for w, m in zip(SAMPLED.weights, measured)) / Fraction(sum(SAMPLED.weights))
    assert trainer_flops(SAMPLED, batch) == pytest.approx(float(expected), rel=1e-12, abs=0)
    uniform = sum(measured) / len(measured)  # control: the draw's weights matter
    assert trainer_flops(SAMPLED, batch) != pytest.approx(float(uniform), rel=1e-6)
