"""A MatFormer submodel as a dense llm run (`shardwright convert extract`, models/matformer/extract.py and
launcher/convert.py): the extracted model computes the MatFormer's logits at that granularity or Mix'n'Match
vector (and not the full model's, nor does the self-check pass against it), its AdamW moments are the prefix
of the MatFormer's, it trains on from the MatFormer's loss, a uniform extraction exports to transformers with
the same logits while a mixed one is refused, and bad input ends with one line. Tiny models, fp32, one process
(train() runs in the test process)."""
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import launcher.convert
from launcher.checkpoint import check_complete
from launcher.cli import USER_ERROR_EXIT, main
from launcher.config import load_config
from launcher.convert import convert
from launcher.trainer import train
from models import get_model_spec
from models.matformer.extract import EXTRACT
from tests.conftest import REPO, tiny_overrides
from tests.unit.test_hf import saved_model, tokens

CONFIG = REPO / "configs" / "matformer" / "tiny.yaml"
# FFN hidden size 192 (dim 64, multiple_of 32): granularities 24, 48, 96 and 192 units.
SMALL = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.mix_n_match=[]",
         "train.seq_len=32", "train.steps=6", "run.stop_at_step=3")
GRANULARITY = ("--granularity", "0.25")
MIX = ("--mix-n-match", "0.5,0.125")
MAX_ABS = 1e-6  # logits of the same arithmetic on the same weights: fp32 rounding at most


pytestmark = pytest.mark.usefixtures("in_process_runs")  # train() runs in this process


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> Path:
    """A MatFormer run stopped at step 3 of 6 (trained once per module, jointly); copy it before training it
    further."""
    run_dir = tmp_path_factory.mktemp("matformer")
    train(load_config(CONFIG, tiny_overrides(run_dir, data_cache, *SMALL)))
    return run_dir


@pytest.fixture(scope="module")
def extracted(trained, tmp_path_factory):
    """extracted(options): the run `convert extract` makes of `trained` with these options (once per module)."""
    runs: dict[tuple, Path] = {}

    def run(options: tuple[str, ...]) -> Path:
        if options not in runs:
            runs[options] = extract(trained, tmp_path_factory.mktemp("extracted") / "out", *options)
        return runs[options]
    return run


def extract(source: Path, out: Path, *options: str) -> Path:
    return convert("extract", source, out, *options, log=lambda _: None)


@torch.no_grad()
def matformer_logits(run_dir: Path, widths: list[int] | None) -> torch.Tensor:
    """The MatFormer's logits with every row running the submodel of these per-layer widths (None: the full model)."""
    inputs = tokens()
    ffn_widths = torch.tensor([widths]).expand(len(inputs), -1) if widths is not None else None
    return saved_model(run_dir)(inputs, ffn_widths=ffn_widths)


def saved_tensors(checkpoint: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose key starts with `prefix`, read straight from DCP."""
    state = {key: torch.empty(size) for key, size in check_complete(checkpoint)["sizes"].items()
             if key.startswith(prefix)}
    dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    return state


@pytest.mark.parametrize("options, widths", [(GRANULARITY, [48, 48]), (MIX, [96, 24])])
def test_the_extracted_llm_computes_the_submodel_and_not_the_full_model(trained, extracted, options, widths):
    out = extracted(options)
    cfg = load_config(out / "config.yaml")
    assert cfg.model.family == "llm" and cfg.model_config().ffn_hidden_dims == widths
    assert not {"granularities", "mode", "weights", "mix_n_match"} & set(cfg.model.args)
    with torch.no_grad():
        ours = saved_model(out)(tokens())
    assert (ours - matformer_logits(trained, widths)).abs().max().item() <= MAX_ABS
    # Negative control: the full MatFormer's logits are far from the submodel's (measured: the submodel's differ by
    # 0.0, the full model's by 0.19-0.20).
    assert (ours - matformer_logits(trained, None)).abs().max().item() > 1000 * MAX_ABS

    # The same step; the AdamW moments are the prefixes of the MatFormer's, the step counts as saved.
    assert json.loads((out / "checkpoints" / "step-3" / "meta.json").read_text())["family"] == "llm"
    old = saved_tensors(trained / "checkpoints" / "step-3", "optimizer.state.")
    new = saved_tensors(out / "checkpoints" / "step-3", "optimizer.state.")
    assert old.keys() == new.keys()
    assert new["optimizer.state.layers.1.feed_forward.w2.weight.exp_avg"].shape == (64, widths[1])
    for key, saved in new.items():
        assert torch.equal(saved, old[key][tuple(slice(0, n) for n in saved.shape)]), key
    assert new["optimizer.state.layers.0.feed_forward.w1.weight.step"].item() == 3


def test_the_self_check_fails_against_the_full_model(trained, tmp_path, monkeypatch):
    """Negative control of convert's self-check: without the submodel's widths the MatFormer runs its full model,
    which the extracted llm does not compute."""
    commands = launcher.convert.checkpoint_commands()
    monkeypatch.setattr(launcher.convert, "checkpoint_commands",
                        lambda: {**commands, "extract": ("matformer", dataclasses.replace(EXTRACT, source_inputs=None))})
    with pytest.raises(RuntimeError, match="convert extract should keep the model's outputs but changed them"):
        extract(trained, tmp_path / "out", *GRANULARITY)
    assert not (tmp_path / "out").exists()


def test_the_extracted_run_trains_on_from_the_submodel_loss(trained, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(trained, source)
    out = extract(source, tmp_path / "out", *MIX)
    cfg = load_config(out / "config.yaml")
    spec = get_model_spec("llm")
    t = cfg.train
    _, loader, _ = spec.data.build_loaders(cfg.data, t.seq_len, t.global_batch_size, t.micro_batch_size, 0, 1,
                                           t.seed, log=lambda _: None)
    dcp.load({"data": loader}, checkpoint_id=out / "checkpoints" / "step-3", no_dist=True)
    [batch] = loader.micro_batches(loader.step)  # the resumed step's one micro-batch
    with torch.no_grad():
        rows = len(batch["tokens"])
        logits = saved_model(source)(batch["tokens"], ffn_widths=torch.tensor([[96, 24]]).expand(rows, -1))
    submodel_loss = (spec.loss.compute(logits, batch).loss_sum / spec.loss.count(batch)).item()

    # A step's loss is computed before its update: the first is the MatFormer submodel's on the same batch.
    losses = train(load_config(out / "config.yaml", ["run.stop_at_step=5"]))["losses"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert abs(losses[0] - submodel_loss) <= 1e-5 * submodel_loss
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][0] == 4


def test_a_uniform_extraction_exports_to_transformers_with_the_submodel_logits(trained, extracted, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = convert("to-hf", extracted(GRANULARITY), tmp_path / "hf", log=lambda _: None)
    assert json.loads((hf / "config.json").read_text())["intermediate_size"] == 48
    model = transformers.LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(tokens()).logits
    assert (theirs - matformer_logits(trained, [48, 48])).abs().max().item() <= 1e-5  # test_hf's fp32 tolerance


def one_line_error(capsys, *argv: str) -> str:
    assert main(["convert", *argv]) == USER_ERROR_EXIT
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_mixed_extraction_is_refused_by_to_hf(extracted, tmp_path, capsys):
    error = one_line_error(capsys, "to-hf", str(extracted(MIX)), str(tmp_path / "hf"))
    assert "model.ffn_hidden_dims=[96, 24] differ between layers" in error
    assert not any(tmp_path.iterdir())


def as_llm_checkpoint(source: Path, destination: Path) -> Path:
    """A copy of the run whose checkpoint's meta.json says it holds an llm model."""
    shutil.copytree(source, destination)
    meta_file = destination / "checkpoints" / "step-3" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["family"] = "llm"
    meta.pop("meta_sha256")  # an edited meta.json fails its checksum; without one it is read as written
    meta_file.write_text(json.dumps(meta))
    return destination


@pytest.mark.parametrize("case, options, message", [
    ("unknown granularity", ["--granularity", "0.3"],
     "--granularity 0.3: 0.3 not among the checkpoint's granularities 0.125, 0.25, 0.5, 1"),
    ("not a number", ["--granularity", "half"], "--granularity half: not a number"),
    ("wrong length", ["--mix-n-match", "0.5,0.5,1"],
     "--mix-n-match 0.5,0.5,1 has 3 fractions; the checkpoint has 2 layers"),
    ("unknown fraction", ["--mix-n-match", "0.5,0.75"], "--mix-n-match 0.5,0.75: 0.75 not among"),
    ("neither", [], "give exactly one of --granularity F and --mix-n-match F1,F2,..."),
    ("both", [*GRANULARITY, *MIX], "give exactly one of --granularity F and --mix-n-match F1,F2,..."),
    ("not a matformer", list(GRANULARITY), "holds a llm model; `convert extract` converts matformer checkpoints"),
])
def test_bad_input_is_one_line_and_exit_code_2(trained, tmp_path, capsys, case, options, message):
    source = as_llm_checkpoint(trained, tmp_path / "llm") if case == "not a matformer" else trained
    before = sorted(p.name for p in tmp_path.iterdir())
    assert message in one_line_error(capsys, "extract", str(source), str(tmp_path / "out"), *options)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
