"""The llm family to and from Hugging Face Llama (models/llm/hf.py, `shardwright convert to-hf`): a trained
checkpoint exported and loaded by transformers computes our logits (and not without the RoPE row
permutation), its tokenizer encodes as ours, HF -> native -> HF is bit-identical, and bad input ends with one
line. Tiny models, fp32, one process (train() runs in the test process)."""
import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

import launcher.convert
import models.llm.hf
from data.tokenizer import Tokenizer
from launcher.checkpoint import Checkpointer, ModelState
from launcher.cli import USER_ERROR_EXIT, main
from launcher.config import load_config
from launcher.convert import convert
from launcher.errors import UserError
from launcher.init_from import open_starting_weights
from launcher.trainer import train
from models import get_model_spec
from models.llm.hf import LlamaAdapter
from parallel.init import materialize
from tests.conftest import TEST_VOCAB, TINY, cached_tokenizer, tiny_overrides

transformers = pytest.importorskip("transformers")

SMALL = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "train.seq_len=32",
         "train.steps=3")
FP32_TOLERANCE = 1e-5
TEXT = "def f(x):\n    return  x**2 + 1  # ünïcode 😀\n\n<s> The with statement 12345\t</s>"


pytestmark = pytest.mark.usefixtures("in_process_runs")  # train() runs in this process


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """trained(tie_embeddings): a run directory trained 3 steps (once per module)."""
    runs: dict[bool, Path] = {}

    def run(tie_embeddings: bool) -> Path:
        if tie_embeddings not in runs:
            runs[tie_embeddings] = tmp_path_factory.mktemp(f"llm-tied-{tie_embeddings}")
            train(load_config(TINY, tiny_overrides(runs[tie_embeddings], data_cache, *SMALL,
                                                   f"model.tie_embeddings={tie_embeddings}")))
        return runs[tie_embeddings]
    return run


def to_hf(source: Path, out: Path, *options: str) -> Path:
    return convert("to-hf", source, out, *options, log=lambda _: None)


def saved_model(run_dir: Path) -> torch.nn.Module:
    """The model of the run's latest checkpoint, built as train builds it."""
    cfg = load_config(run_dir / "config.yaml")
    with torch.device("meta"):
        model = get_model_spec(cfg.model.family).model_cls(cfg.model_config())
    materialize(model, torch.device("cpu"), cfg.train.seed)
    dcp.load({"model": ModelState([model])}, checkpoint_id=Checkpointer(run_dir, 1, 0).latest_dir(), no_dist=True)
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, TEST_VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def hf_logits(directory: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model(tokens()).logits


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_export_computes_our_logits_in_transformers(trained, tmp_path, tie_embeddings):
    run_dir = trained(tie_embeddings)
    out = to_hf(run_dir, tmp_path / "hf")
    with torch.no_grad():
        ours = saved_model(run_dir)(tokens())
    assert (hf_logits(out) - ours).abs().max().item() <= FP32_TOLERANCE
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] == tie_embeddings
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) != tie_embeddings
    assert not any(".converting" in p.name for p in tmp_path.iterdir())


def test_export_without_the_rope_permutation_differs(trained, tmp_path, monkeypatch):
    """Negative control: the comparison above catches a missing wq/wk row permutation."""
    monkeypatch.setattr(models.llm.hf, "interleaved_to_half_rotation", lambda weight, n_heads: weight)
    run_dir = trained(False)
    with torch.no_grad():
        ours = saved_model(run_dir)(tokens())
    # 3 steps leave the weights near their initialization: 7.5e-3 here, 750x the tolerance.
    assert (hf_logits(to_hf(run_dir, tmp_path / "hf")) - ours).abs().max().item() > 100 * FP32_TOLERANCE


def test_export_in_bf16(trained, tmp_path):
    out = to_hf(trained(False), tmp_path / "hf", "--dtype", "bf16")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_exported_tokenizer_encodes_as_ours(trained, tmp_path, data_cache):
    out = to_hf(trained(False), tmp_path / "hf")
    ours = Tokenizer(cached_tokenizer(data_cache))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs(TEXT, add_special_tokens=False).input_ids == ours.encode(TEXT)
    assert theirs.decode(ours.encode(TEXT)) == TEXT
    assert (theirs.eos_token_id, len(theirs)) == (ours.eos_id, ours.vocab_size)


def test_hf_model_loads_natively_with_its_logits_and_round_trips_bit_identically():
    """A randomly initialized LlamaForCausalLM (transformers' own) -> native: our model computes its logits;
    -> HF again: the same tensors, bit for bit."""
    model_cfg = dataclasses.replace(get_model_spec("llm").config_cls(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    vocab_size=TEST_VOCAB, norm_eps=1e-6, rope_theta=5e5)
    adapter = LlamaAdapter()
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**adapter.export_config(model_cfg, 64)), dtype=torch.float32).eval()
    hf_weights = hf_model.state_dict()
    native = adapter.to_native(hf_weights, model_cfg)
    ours = get_model_spec("llm").model_cls(model_cfg).eval()
    ours.load_state_dict(native, strict=True)
    with torch.no_grad():
        assert (ours(tokens()) - hf_model(tokens()).logits).abs().max().item() <= FP32_TOLERANCE
    back = adapter.from_native(native, model_cfg)
    assert back.keys() == hf_weights.keys()
    assert all(torch.equal(back[name], hf_weights[name]) for name in back)


def imported(directory: Path, model_cfg) -> dict[str, torch.Tensor]:
    """The parameters checkpoint.init_from's reader fills from `directory` (into a model of another seed)."""
    weights = open_starting_weights(directory, get_model_spec("llm"), model_cfg)
    with torch.device("meta"):
        model = get_model_spec("llm").model_cls(model_cfg)
    materialize(model, torch.device("cpu"), seed=1234)
    weights.load([model])
    return model.state_dict()


def with_inv_freq(source: Path, directory: Path, inv_freq: torch.Tensor, n_layers: int) -> Path:
    """A copy of the HF directory `source` whose weights also hold each layer's rotary_emb.inv_freq, as exports of
    transformers < 4.31 saved them."""
    tensors = load_file(source / "model.safetensors")
    tensors |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(n_layers)}
    shutil.copytree(source, directory)
    safetensors.torch.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_saved_rope_inverse_frequencies_are_checked_and_dropped(tmp_path, dtype):
    """A checkpoint holding each layer's RoPE inv_freq buffer (saved by old exports, in fp16 by a model cast to it,
    transformers' own values here) imports to the same model as without them; one that holds another RoPE's (a
    checkpoint trained with another rope_theta than its config.json says) is refused naming the tensor, one of
    another size before anything is read."""
    model_cfg = dataclasses.replace(get_model_spec("llm").config_cls(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    vocab_size=TEST_VOCAB, norm_eps=1e-6, rope_theta=5e5)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**LlamaAdapter().export_config(model_cfg, 64)), dtype=torch.float32)
    hf_model.save_pretrained(tmp_path / "plain")
    inv_freq = hf_model.model.rotary_emb.inv_freq.to(dtype)
    expected = imported(tmp_path / "plain", model_cfg)
    old = with_inv_freq(tmp_path / "plain", tmp_path / "old", inv_freq, model_cfg.n_layers)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in imported(old, model_cfg).items())

    other_theta = transformers.AutoConfig.for_model(**LlamaAdapter().export_config(
        dataclasses.replace(model_cfg, rope_theta=1e4), 64))
    wrong = transformers.AutoModelForCausalLM.from_config(other_theta).model.rotary_emb.inv_freq.to(dtype)
    wrong = with_inv_freq(tmp_path / "plain", tmp_path / "wrong", wrong, model_cfg.n_layers)
    with pytest.raises(UserError, match=r"tensor model\.layers\.0\.self_attn\.rotary_emb\.inv_freq holds other RoPE "
                                        r"inverse frequencies than config.json's RoPE \(rope_theta=500000, .*element 1 "):
        imported(wrong, model_cfg)
    shorter = with_inv_freq(tmp_path / "plain", tmp_path / "shorter", inv_freq[:-1], model_cfg.n_layers)
    with pytest.raises(UserError, match=r"rotary_emb\.inv_freq is torch.float\d+ of shape \[7\], but .* has 8 "):
        open_starting_weights(shorter, get_model_spec("llm"), model_cfg)


def test_a_tensor_without_counterpart_is_named(tmp_path):
    """A tensor the Llama mapping does not know (a Qwen3-style q_norm here) is refused naming it, and naming no
    family: the MoE import, SOLO's start and DeepSpeed's import of a Hugging Face model share this mapping."""
    model_cfg = dataclasses.replace(get_model_spec("llm").config_cls(), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    vocab_size=TEST_VOCAB)
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        **LlamaAdapter().export_config(model_cfg, 64)), dtype=torch.float32).save_pretrained(tmp_path / "plain")
    tensors = load_file(tmp_path / "plain" / "model.safetensors") | {
        "model.layers.1.self_attn.q_norm.weight": torch.ones(16)}
    safetensors.torch.save_file(tensors, tmp_path / "plain" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"tensor model\.layers\.1\.self_attn\.q_norm\.weight has no counterpart in "
                                        r"shardwright's model"):
        imported(tmp_path / "plain", model_cfg)


def test_a_config_field_llama_cannot_express_is_named():
    @dataclasses.dataclass
    class WithQKNorm(get_model_spec("llm").config_cls):
        qk_norm: bool = True

    with pytest.raises(ValueError, match="model field qk_norm has no counterpart in LlamaConfig"):
        LlamaAdapter().export_config(WithQKNorm(vocab_size=TEST_VOCAB), 64)


def test_config_json_is_read_as_transformers_reads_it():
    """A rope_scaling beside rope_parameters is what transformers 5 merges in (a linear scaling here, which the
    run's RoPE does not compute): refused, naming the merged rope_parameters; the export itself passes (control),
    and a config.json transformers cannot build is one line."""
    model_cfg = get_model_spec("llm").config_cls(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=TEST_VOCAB)
    adapter = LlamaAdapter()
    exported = adapter.export_config(model_cfg, 64)
    assert adapter.config_problems(exported, model_cfg) == []
    scaled = {**exported, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    (problem,) = adapter.config_problems(scaled, model_cfg)
    assert problem.startswith("config.json has rope_parameters=") and "'linear'" in problem
    (problem,) = adapter.config_problems({**exported, "num_attention_heads": 3}, model_cfg)
    assert problem.startswith("transformers cannot read config.json as a llama config")


def cli_error(capsys, *argv: str) -> str:
    assert main(["convert", "to-hf", *argv]) == USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_out_that_exists_is_refused(trained, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep").write_text("mine")
    assert "exists" in cli_error(capsys, str(trained(False)), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "keep").read_text() == "mine"


def test_a_family_without_a_hf_mapping_is_refused(trained, tmp_path, capsys, monkeypatch):
    spec = get_model_spec("llm")
    monkeypatch.setattr(launcher.convert, "get_model_spec",
                        lambda family: dataclasses.replace(spec, state_dict_adapters={}))
    assert "has no mapping to Hugging Face's format" in cli_error(capsys, str(trained(False)), str(tmp_path / "hf"))
    assert not any(tmp_path.iterdir())


def test_a_bad_shard_size_or_a_missing_directory_is_refused_before_anything_is_written(trained, tmp_path, capsys):
    (tmp_path / "weights.safetensors").write_text("")
    assert "weights.safetensors is a file; pass a run directory" in cli_error(
        capsys, str(tmp_path / "weights.safetensors"), str(tmp_path / "hf"))
    (tmp_path / "weights.safetensors").unlink()
    assert "--max-shard-size abc: Unit" in cli_error(capsys, str(trained(False)), str(tmp_path / "hf"),
                                                     "--max-shard-size", "abc")
    assert main(["convert", "to-file", str(trained(False)), str(tmp_path / "missing" / "w.safetensors")]) == \
        USER_ERROR_EXIT
    assert "missing is not a directory" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command, out", [("to-hf", "hf"), ("to-file", "w.safetensors")])
def test_out_made_by_another_process_meanwhile_is_left_as_it_is(trained, tmp_path, capsys, monkeypatch, command, out):
    """OUT appears while the conversion writes (another conversion to the same path published first): this one
    refuses and removes its staging, OUT keeps the other's files; a dead conversion's staging is cleared, a live
    one's kept. The control: without the competitor the same conversion publishes OUT, readable by the group."""
    out = tmp_path / out
    dead, live = (tmp_path / launcher.convert.STAGING.format(name=out.name, pid=pid) for pid in (2**22 + 1, 1))
    dead.mkdir()
    live.mkdir()
    real_save_file = safetensors.torch.save_file

    def competing_save_file(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        if out.exists():
            return
        if command == "to-hf":  # the other conversion publishes first
            out.mkdir()
            (out / "theirs").write_text("theirs")
        else:
            out.write_text("theirs")

    monkeypatch.setattr(safetensors.torch, "save_file", competing_save_file)
    monkeypatch.setattr(launcher.convert, "save_file", competing_save_file)
    assert main(["convert", command, str(trained(False)), str(out)]) == USER_ERROR_EXIT
    assert "was created by another process while this conversion ran" in capsys.readouterr().err
    assert (out / "theirs" if command == "to-hf" else out).read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name])

    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    monkeypatch.setattr(launcher.convert, "save_file", real_save_file)
    control = tmp_path / f"control-{out.name}"
    assert main(["convert", command, str(trained(False)), str(control)]) == 0
    weights = control / "model.safetensors" if command == "to-hf" else control
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask  # safetensors alone writes 0600


def test_the_families_to_hf_names_are_those_it_exports():
    """SOLO's "hf" mapping imports a Llama as its start and exports nothing: a refusal listing what `convert to-hf`
    converts leaves it out."""
    exports = {family: launcher.convert._exports(get_model_spec(family), "hf") for family in launcher.convert.FAMILIES}
    assert exports == {"llm": True, "moe": True, "deltanet": True, "tokenformer": False, "matformer": False,
                       "solo": False}
