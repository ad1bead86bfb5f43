"""SOLO's invariants (models/solo, model-families.md section 5), on small fp64 models:

- started from a language model (models/solo/start.py: its rows extended, the patch projection zero), text-only
  input gives the language model's logits on the text ids, with or without patches at the text positions;
  a non-zero projection (the negative control) changes the logits where patches are;
- no gradient flows from image-token targets: the loss's gradient is zero at every position whose next token
  is image markup (or padding), non-zero at every caption position;
- packed equals unpacked: each sample's logits in a packed row (document_ids, positions restarting) equal the
  sample run alone, and not without the document mask (negative control);
- flops_per_token equals what FlopCounterMode counts (the patch projection takes no input gradient);
- the demo data: deterministic, captions that parse back to their attributes, batches whose patches are zero
  off <vpatch> tokens; the caption accuracy scores a model that emits the truth 1 and one that emits nonsense 0.
"""
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data.images import PATCH_VALUES, VisionTokens, build_row, caption_sample, image_tokens
from data.shapes import draw, parse_caption, shape_of
from models.common.loss import IGNORE_INDEX
from models.common.text import TOKEN_LOSS
from models.llm.model import LLMConfig, Transformer
from models.solo.model import SOLO, SOLOConfig, flops_per_token
from models.solo.start import from_language_model
from parallel.init import init_parameters

VOCAB = 50
SIZES = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16)
VISION = VisionTokens.after(VOCAB)
aten = torch.ops.aten


def _solo(seed: int = 0) -> SOLO:
    model = SOLO(SOLOConfig(**SIZES)).double()
    init_parameters(model, seed)
    return model


def _sample(rows: int, cols: int, caption: list[int], seed: int):
    patches = np.random.default_rng(seed).integers(0, 256, (rows * cols, PATCH_VALUES), dtype=np.uint8)
    return caption_sample(patches, rows, cols, caption, VISION)


def _inputs(row: dict) -> dict:
    tokens = torch.from_numpy(row["tokens"])[None]
    patches = torch.from_numpy(row["patches"]).double()[None] / 255
    return {"tokens": tokens, "patches": patches, "positions": torch.from_numpy(row["positions"])[None],
            "document_ids": torch.from_numpy(row["document_ids"])[None]}


def test_started_from_a_language_model_text_gives_its_logits():
    llm = Transformer(LLMConfig(**SIZES)).double()
    init_parameters(llm, 3)
    solo = _solo()
    solo.load_state_dict(from_language_model(llm.state_dict(), solo.cfg))
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    patches = torch.randn(2, 12, PATCH_VALUES, dtype=torch.float64)
    want = llm(tokens)
    assert solo.tok_embeddings.weight.shape[0] == VOCAB + 4 and not solo.patch_embeddings.weight.any()
    for given in (None, patches):
        torch.testing.assert_close(solo(tokens, given)[..., :VOCAB], want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        solo.patch_embeddings.weight.normal_(0, 0.02)
    assert (solo(tokens, patches)[..., :VOCAB] - want).abs().max() > 1e-3


def test_a_start_of_another_vocabulary_is_refused():
    llm = Transformer(LLMConfig(**{**SIZES, "vocab_size": VOCAB + 4}))
    with pytest.raises(ValueError, match="data.vocab_size"):
        from_language_model(llm.state_dict(), SOLOConfig(**SIZES))


def test_no_gradient_from_image_token_targets():
    captions = ([7, 8, 9, 2], [11, 12, 2])
    samples = [_sample(2, 3, captions[0], 0), _sample(1, 2, [], 1), _sample(3, 1, captions[1], 2)]
    row = build_row(samples, 48, pad_token=3, patch_token=VISION.patch)
    batch = {**_inputs(row), "targets": torch.from_numpy(row["targets"])[None]}
    logits = _solo()(batch["tokens"], batch["patches"], batch["positions"], batch["document_ids"]).detach()
    logits.requires_grad_()
    TOKEN_LOSS.compute(logits, batch).loss_sum.backward()
    grad_rows = logits.grad[0].abs().sum(-1)
    # Predicting a caption token: the last image token (</vision>) and every caption token but the last.
    tokens = row["tokens"]
    next_is_caption = np.zeros(len(tokens), bool)
    start = 0
    for sample in samples:
        n = len(sample)
        next_is_caption[start:start + n - 1] = sample.is_target[1:]
        start += n
    assert next_is_caption.sum() == sum(len(c) for c in captions) == TOKEN_LOSS.count(batch)
    assert (grad_rows[torch.from_numpy(next_is_caption)] > 0).all()
    assert (grad_rows[torch.from_numpy(~next_is_caption)] == 0).all()
    assert set(tokens[np.flatnonzero(~next_is_caption[:-1]) + 1]) & set(VISION.ids())  # image markup is excluded


def test_packed_equals_unpacked():
    solo = _solo(1)
    samples = [_sample(2, 2, [5, 6, 2], 0), _sample(1, 3, [9, 2], 1), _sample(2, 1, [4, 4, 4, 2], 2)]
    packed = _inputs(build_row(samples, 40, pad_token=3, patch_token=VISION.patch))
    together = solo(**packed)[0]
    alone = [solo(**_inputs(build_row([s], len(s), pad_token=3, patch_token=VISION.patch)))[0] for s in samples]
    start = 0
    for sample, logits in zip(samples, alone):
        torch.testing.assert_close(together[start:start + len(sample)], logits, rtol=1e-10, atol=1e-10)
        start += len(sample)
    unmasked = solo(packed["tokens"], packed["patches"], packed["positions"])[0]  # negative control
    assert (unmasked[len(samples[0]):start] - together[len(samples[0]):start]).abs().max() > 1e-4


def test_flops_per_token_is_exact():
    seq = 10
    model = _solo().float()
    tokens = torch.randint(0, VOCAB + 4, (1, seq), generator=torch.Generator().manual_seed(0))
    patches = torch.randn(1, seq, PATCH_VALUES)
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH):
        with forward:
            out = model(tokens, patches).sum()
        with backward:
            out.backward()
    f, b = forward.get_flop_counts()["Global"], backward.get_flop_counts()["Global"]
    assert set(f) == {aten.mm, aten.bmm}
    # The math backend computes the whole T x T square of scores (bmm); a causal model attends (T + 1) / 2T of it.
    attention = Fraction(f[aten.bmm] + b[aten.bmm]) * Fraction(seq + 1, 2 * seq)
    assert Fraction(flops_per_token(model.cfg, seq)) * seq == f[aten.mm] + b[aten.mm] + attention
    assert b[aten.mm] < 2 * f[aten.mm]  # the projection's input (data) takes no gradient


def test_demo_images_are_deterministic_and_captions_parse():
    image, shape = draw(0, "train", 5)
    again, _ = draw(0, "train", 5)
    assert np.array_equal(np.asarray(image), np.asarray(again)) and shape == shape_of(0, "train", 5)
    assert parse_caption(shape.caption) == shape and parse_caption("a small red") is None
    valid = [shape_of(0, "valid", i) for i in range(64)]
    assert valid != [shape_of(0, "train", i) for i in range(64)]
    pixels = np.asarray(image)
    assert len({tuple(p) for p in pixels.reshape(-1, 3)}) > 1  # a shape was drawn on the background
    assert len(image_tokens(2, 2, VISION)) == 7 and image.size == (64, 64)


@pytest.fixture(scope="module")
def demo(data_cache):
    from types import SimpleNamespace

    from models.solo.data import build_loaders
    from tests.conftest import TEST_VOCAB

    data_cfg = SimpleNamespace(prepared=[], source="pydoc", vocab_size=TEST_VOCAB, cache_dir=str(data_cache),
                               valid_fraction=0.05)
    return {(dp, rank): build_loaders(data_cfg, 64, 8, 2, rank, dp, 0, log=lambda _: None)
            for dp, rank in ((1, 0), (2, 0), (2, 1))}


def test_demo_batches_carry_each_patch_token_its_patch(demo):
    data, train, _ = demo[1, 0]
    batches = train.micro_batches(3)
    assert len(batches) == 4 and batches[0]["patches"].shape == (2, 64, PATCH_VALUES)
    for batch in batches:
        is_patch = batch["tokens"] == data.vision.patch
        assert is_patch.any() and (batch["patches"].abs().sum(-1) > 0).eq(is_patch).all()
        assert not torch.isin(batch["targets"], torch.tensor(data.vision.ids())).any()
        assert (batch["targets"] != IGNORE_INDEX).any()
    # Rows are a function of (seed, step): two dp ranks serve the one-rank batch's halves.
    halves = [b["patches"] for rank in (0, 1) for b in demo[2, rank][1].micro_batches(3)]
    torch.testing.assert_close(torch.cat(halves), torch.cat([b["patches"] for b in batches]), rtol=0, atol=0)


def test_caption_accuracy_scores_an_oracle_and_its_blanked_control(demo):
    from models.solo.data import CAPTION_EVAL_IMAGES, caption_accuracy, caption_prompts

    data = demo[1, 0][0]
    start = len(image_tokens(2, 2, data.vision))
    truths = [data.valid.caption_tokens(shape_of(0, "valid", i)) for i in range(CAPTION_EVAL_IMAGES)]
    prompts, rows, starts = caption_prompts(data, range(CAPTION_EVAL_IMAGES), blanked=False)
    image_of = {prompts["patches"][row, first - start:first].numpy().tobytes(): i
                for i, (row, first) in enumerate(zip(rows.tolist(), starts.tolist()))}
    calls = []

    def oracle(batch):
        """A model that reads the image perfectly: it knows each image by its patches and emits its caption;
        blanked (no known patches) it ends the caption at once."""
        out = torch.full_like(batch["tokens"], data.tokenizer.eos_id)
        for row, first in zip(rows.tolist(), starts.tolist()):
            if (i := image_of.get(batch["patches"][row, first - start:first].numpy().tobytes())) is not None:
                out[row, first - 1:first - 1 + len(truths[i])] = torch.tensor(truths[i])
        calls.append(batch["tokens"].shape)
        return out

    metrics = caption_accuracy(data, oracle)
    assert calls and all(shape == (len(set(rows.tolist())), 64) for shape in calls)
    assert {k: v for k, v in metrics.items() if not k.endswith("_blanked")} == {
        f"caption_{name}": 1.0 for name in ("exact", "size", "colour", "shape", "place")}
    assert {k: v for k, v in metrics.items() if k.endswith("_blanked")} == {
        f"caption_{name}_blanked": 0.0 for name in ("exact", "size", "colour", "shape", "place")}


def _llama_directory(directory, vocab_size: int = VOCAB):
    """A Hugging Face Llama directory (config.json + model.safetensors) of a freshly initialized `llm`."""
    import json

    from safetensors.torch import save_file

    from models.llm.hf import LlamaAdapter

    llm = Transformer(LLMConfig(**{**SIZES, "vocab_size": vocab_size}))
    init_parameters(llm, 3)
    adapter = LlamaAdapter()
    save_file({k: v.contiguous() for k, v in adapter.from_native(llm.state_dict(), llm.cfg).items()},
              directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(adapter.export_config(llm.cfg, 64)))
    return llm


def test_a_hugging_face_llama_starts_a_run(tmp_path):
    """checkpoint.init_from's path (launcher/init_from.py): the Llama's weights, the new rows, a zero projection."""
    from launcher.init_from import open_starting_weights
    from models import get_model_spec

    llm = _llama_directory(tmp_path)
    cfg = SOLOConfig(**SIZES)
    weights = open_starting_weights(tmp_path, get_model_spec("solo"), cfg)
    solo = SOLO(cfg)
    init_parameters(solo, 0)  # as a run initializes before it loads the starting weights
    weights.load([solo])
    assert not solo.patch_embeddings.weight.any()
    torch.testing.assert_close(solo.tok_embeddings.weight[VOCAB:], llm.tok_embeddings.weight.mean(0).expand(4, -1))
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(solo(tokens, torch.randn(2, 12, PATCH_VALUES))[..., :VOCAB], llm(tokens))


def test_a_hugging_face_llama_of_another_vocabulary_is_refused(tmp_path):
    from launcher.errors import UserError
    from launcher.init_from import open_starting_weights
    from models import get_model_spec

    _llama_directory(tmp_path, vocab_size=VOCAB + 4)
    with pytest.raises(UserError, match="vocab_size"):
        open_starting_weights(tmp_path, get_model_spec("solo"), SOLOConfig(**SIZES))


@pytest.mark.usefixtures("in_process_runs")
def test_an_llm_run_starts_a_run(tmp_path, data_cache):
    """checkpoint.init_from an `llm` run's directory (ModelSpec.starts_from): its weights under the LLM's names, the
    new rows, a zero projection; the trainer then checks the run's tokenizer is the checkpoint's."""
    from launcher.config import load_config
    from launcher.init_from import open_starting_weights
    from launcher.trainer import train
    from models import get_model_spec
    from tests.conftest import TINY, TEST_VOCAB, tiny_overrides

    sizes = ("model.dim=32", "model.n_layers=2", "train.steps=1")
    train(load_config(TINY, tiny_overrides(tmp_path / "llm", data_cache, *sizes)))
    llm_cfg = load_config(TINY, tiny_overrides(tmp_path / "unused", data_cache, *sizes)).model_config()
    llm = Transformer(llm_cfg)
    llm_weights = open_starting_weights(tmp_path / "llm", get_model_spec("llm"), llm_cfg)
    llm_weights.load([llm])
    cfg = SOLOConfig(**{f: getattr(llm_cfg, f) for f in llm_cfg.__dataclass_fields__})
    weights = open_starting_weights(tmp_path / "llm", get_model_spec("solo"), cfg)
    assert weights.tokenizer == llm_weights.tokenizer is not None
    solo = SOLO(cfg)
    init_parameters(solo, 0)
    weights.load([solo])
    assert not solo.patch_embeddings.weight.any()
    tokens = torch.randint(0, TEST_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(solo(tokens, torch.randn(2, 12, PATCH_VALUES))[..., :TEST_VOCAB], llm(tokens),
                                   rtol=0, atol=0)


def shapes_parquet(path, n: int):
    """n of the demo's drawn images (PNG) with their captions, as an HF parquet file with an Image column."""
    import io

    import datasets

    rows = {"image": [], "caption": []}
    for i in range(n):
        image, shape = draw(0, "train", i)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["caption"].append(shape.caption)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


@pytest.mark.usefixtures("in_process_runs")
def test_a_prepared_image_text_dataset_trains_and_other_kinds_are_refused(tmp_path, data_cache, capsys):
    """`shardwright prepare --image-column` output as data.prepared: SOLO trains on it (its rows are the dataset's
    samples, split by data.splits); a text dataset for SOLO, or this one for the llm family, is one line."""
    from launcher.cli import main
    from launcher.config import load_config, validate
    from launcher.errors import UserError
    from launcher.trainer import train
    from data.errors import DataError
    from data.image_text import open_image_text
    from tests.conftest import TINY, cached_tokenizer, tiny_overrides

    corpus = shapes_parquet(tmp_path / "shapes.parquet", 96)
    assert main(["prepare", str(corpus), "--image-column", "--text-field", "caption", "--tokenizer",
                 str(cached_tokenizer(data_cache)), "--output", str(tmp_path / "ds"), "--no-progress"]) == 0
    dataset = open_image_text(tmp_path / "ds")
    assert len(dataset) == 96 and dataset[5].patches.shape == (4, PATCH_VALUES)

    solo_tiny = TINY.parents[1] / "solo" / "tiny.yaml"
    run = tiny_overrides(tmp_path / "run", data_cache, f"data.prepared=[{tmp_path / 'ds'}]", "data.splits=[75,25,0]",
                         "train.steps=6", "train.lr=3e-3", "model.dim=32", "model.n_layers=2")
    summary = train(load_config(solo_tiny, run))
    losses = summary["losses"]
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not any(key.startswith("caption_") for key in summary["eval"])  # no attributes to score a corpus by
    out = capsys.readouterr().out  # the loaders speak before the run directory exists
    assert f"prepared image-text dataset {tmp_path / 'ds'}: train 72 images" in out, out

    (tmp_path / "text.jsonl").write_text("".join(f'{{"text": "a small red circle number {i}"}}\n' for i in range(50)))
    assert main(["prepare", str(tmp_path / "text.jsonl"), "--tokenizer", str(cached_tokenizer(data_cache)),
                 "--output", str(tmp_path / "text"), "--no-progress"]) == 0
    text_for_solo = tiny_overrides(tmp_path / "r2", data_cache, f"data.prepared=[{tmp_path / 'text'}]")
    image_text_for_llm = tiny_overrides(tmp_path / "r3", data_cache, f"data.prepared=[{tmp_path / 'ds'}]")
    for config, overrides, message in [(solo_tiny, text_for_solo, "but a image-text one is needed"),
                                       (TINY, image_text_for_llm, "is a prepared image-text dataset, but a text one")]:
        with pytest.raises((UserError, DataError), match=message):
            validate(load_config(config, overrides), 1)


def test_a_mistral_without_a_sliding_window_starts_a_run_and_one_with_it_is_refused(tmp_path):
    """SOLO-7B starts from Mistral-7B: a MistralForCausalLM directory imports as the Llama it is when its attention
    is full (sliding_window null); a sliding window is one line."""
    import json

    from launcher.errors import UserError
    from launcher.init_from import open_starting_weights
    from models import get_model_spec

    llm = _llama_directory(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for window in (None, 4096):
        (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="mistral",
                                                              architectures=["MistralForCausalLM"],
                                                              sliding_window=window)))
        if window is not None:
            with pytest.raises(UserError, match="sliding_window=4096"):
                open_starting_weights(tmp_path, get_model_spec("solo"), SOLOConfig(**SIZES))
            continue
        solo = SOLO(SOLOConfig(**SIZES))
        init_parameters(solo, 0)
        open_starting_weights(tmp_path, get_model_spec("solo"), SOLOConfig(**SIZES)).load([solo])
        tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(solo(tokens, torch.zeros(2, 12, PATCH_VALUES))[..., :VOCAB], llm(tokens))
