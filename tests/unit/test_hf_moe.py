"""The moe family to Hugging Face (models/moe/hf.py): each form the adapter picks (Mixtral, Qwen2-MoE, Glm4-MoE),
written as an HF directory and loaded by transformers, computes our logits (and not with gate and up swapped);
native -> HF -> native is bit-identical; configs no transformers class expresses are refused with one line naming
the field. Tiny random models with a non-trivial routing, fp32, one process."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

import models.moe.hf
from launcher.checkpoint import Checkpointer, ModelState
from launcher.cli import USER_ERROR_EXIT, main
from launcher.config import load_config
from launcher.convert import convert
from launcher.errors import UserError
from launcher.hf_files import write_hf_directory
from launcher.init_from import open_starting_weights
from launcher.trainer import train
from models import get_model_spec
from models.moe.hf import MoEAdapter
from parallel.init import materialize
from tests.conftest import REPO, TEST_VOCAB, cached_tokenizer, tiny_overrides

transformers = pytest.importorskip("transformers")

FP32_TOLERANCE = 1e-5  # relative to the largest logit
BASE = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=TEST_VOCAB, n_experts=8, top_k=2, moe_hidden_dim=32,
            norm_eps=1e-6)
FORMS = {
    "MixtralForCausalLM": {},
    "Qwen2MoeForCausalLM": dict(n_shared_experts=1, n_dense_layers=1, renormalize=False),
    "Glm4MoeForCausalLM": dict(router="sigmoid", n_groups=4, topk_groups=2, route_scale=2.5, bias_update_rate=1e-3,
                               n_shared_experts=2, n_dense_layers=1),
}


def moe_config(**fields):
    return dataclasses.replace(get_model_spec("moe").config_cls(), **BASE, **fields)


def random_model(cfg) -> torch.nn.Module:
    """Initialized with a seed, then the routers made decisive (and the selection biases, where they count,
    non-zero) so that a wrong routing shows in the logits."""
    with torch.device("meta"):
        model = get_model_spec("moe").model_cls(cfg)
    materialize(model, torch.device("cpu"), 0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.gate.weight") or (name.endswith("expert_bias") and cfg.bias_update_rate > 0):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, TEST_VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def relative_difference(ours: torch.nn.Module, directory: Path) -> float:
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
        output_loading_info=True)
    assert not any(info.values()), info  # every tensor written is loaded, none is missing
    ours_logits = ours(tokens())
    return ((theirs.eval()(tokens()).logits - ours_logits).abs().max() / ours_logits.abs().max()).item()


def export(model, cfg, directory: Path, tokenizer_model: Path) -> Path:
    adapter = MoEAdapter()
    directory.mkdir()
    write_hf_directory(directory, adapter.from_native(model.state_dict(), cfg), adapter.export_config(cfg, 64),
                       tokenizer_model, torch.float32)
    return directory


@pytest.fixture(scope="module")
def tokenizer_model(data_cache) -> Path:
    return cached_tokenizer(data_cache)


@pytest.mark.parametrize("architecture", FORMS)
def test_each_form_computes_our_logits_in_transformers(architecture, tmp_path, tokenizer_model):
    cfg = moe_config(**FORMS[architecture])
    model = random_model(cfg)
    out = export(model, cfg, tmp_path / "hf", tokenizer_model)
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    assert relative_difference(model, out) <= FP32_TOLERANCE


@pytest.mark.parametrize("architecture", FORMS)
def test_gate_and_up_swapped_differ(architecture, tmp_path, tokenizer_model, monkeypatch):
    """Negative control: the comparison above catches experts whose gate and up projections are exchanged."""
    monkeypatch.setattr(models.moe.hf, "_SWIGLU", ("w3", "w1", "w2"))
    cfg = moe_config(**FORMS[architecture])
    model = random_model(cfg)
    assert relative_difference(model, export(model, cfg, tmp_path / "hf", tokenizer_model)) > 100 * FP32_TOLERANCE


@pytest.mark.parametrize("fields", [*FORMS.values(), dict(n_dense_layers=1), dict(router="sigmoid")],
                         ids=[*FORMS, "qwen2-moe-without-shared", "glm4-moe-without-bias-or-shared"])
def test_native_to_hf_and_back_is_bit_identical(fields):
    cfg = moe_config(**fields)
    native = random_model(cfg).state_dict()
    back = MoEAdapter().to_native(MoEAdapter().from_native(native, cfg), cfg)
    assert back.keys() == native.keys()
    assert all(torch.equal(back[name], native[name]) for name in native)


@pytest.mark.parametrize("fields, field", [
    (dict(capacity_factor=1.25), "capacity_factor"),
    (dict(bias_update_rate=1e-3), "bias_update_rate"),
    (dict(route_scale=2.0), "route_scale"),
    (dict(n_groups=4, topk_groups=2), "n_groups"),
])
def test_a_config_no_transformers_class_expresses_is_named(fields, field):
    with pytest.raises(ValueError, match=f"^model field {field} "):
        MoEAdapter().export_config(moe_config(**fields), 64)


@pytest.mark.parametrize("architecture, named", [
    ("MixtralForCausalLM", ["rms_norm_eps=1e-05", "rope_parameters={'rope_theta': 1000000.0"]),
    ("Qwen2MoeForCausalLM", []),  # its class's defaults are the run's values
    ("Glm4MoeForCausalLM", ["rms_norm_eps=1e-05"]),
])
def test_fields_config_json_omits_take_the_class_defaults(architecture, named):
    """A config.json without rms_norm_eps and rope_parameters means the class's own defaults (Mixtral's RoPE theta
    is 1e6, not Llama's 1e4): named where they differ from the run's model, accepted where they do not."""
    cfg = moe_config(**FORMS[architecture])
    exported = MoEAdapter().export_config(cfg, 64)
    assert MoEAdapter().config_problems(exported, cfg) == []
    omitted = {key: value for key, value in exported.items() if key not in ("rms_norm_eps", "rope_parameters")}
    problems = MoEAdapter().config_problems(omitted, cfg)
    assert len(problems) == len(named)
    for problem, value in zip(sorted(problems), sorted(named)):
        assert problem.startswith(f"config.json has {value}")


def test_an_untrained_selection_bias_from_hf_is_refused():
    cfg = moe_config(router="sigmoid")
    hf = MoEAdapter().from_native(random_model(cfg).state_dict(), cfg)
    hf["model.layers.0.mlp.gate.e_score_correction_bias"] = torch.ones(cfg.n_experts)
    with pytest.raises(ValueError, match="bias_update_rate is 0"):
        MoEAdapter().to_native(hf, cfg)


def train_tiny(run_dir: Path, data_cache: Path, *extra: str) -> Path:
    """configs/moe/tiny.yaml (a dense first layer: Qwen2-MoE) shrunk and trained 2 steps."""
    train(load_config(REPO / "configs" / "moe" / "tiny.yaml", tiny_overrides(
        run_dir, data_cache, "model.dim=64", "model.n_layers=2", "model.moe_hidden_dim=32", "train.seq_len=32",
        "train.steps=2", *extra)))
    return run_dir


@pytest.mark.usefixtures("in_process_runs")
def test_convert_to_hf_of_a_trained_checkpoint(tmp_path, data_cache):
    run_dir = train_tiny(tmp_path / "run", data_cache)
    out = convert("to-hf", run_dir, tmp_path / "hf", log=lambda _: None)
    cfg = load_config(run_dir / "config.yaml")
    with torch.device("meta"):
        model = get_model_spec("moe").model_cls(cfg.model_config())
    materialize(model, torch.device("cpu"), cfg.train.seed)
    dcp.load({"model": ModelState([model])}, checkpoint_id=Checkpointer(run_dir, 1, 0).latest_dir())
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    assert relative_difference(model.eval(), out) <= FP32_TOLERANCE


@pytest.mark.usefixtures("in_process_runs")
def test_convert_to_hf_of_a_dropping_checkpoint_is_refused_in_one_line(tmp_path, data_cache, capsys):
    run_dir = train_tiny(tmp_path / "run", data_cache, "model.capacity_factor=1.25")
    capsys.readouterr()
    assert main(["convert", "to-hf", str(run_dir), str(tmp_path / "hf")]) == USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "model field capacity_factor > 0" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("architecture", FORMS)
def test_each_form_imports_bit_for_bit(architecture, tmp_path, tokenizer_model):
    """checkpoint.init_from a directory of each class: the layer-at-a-time import (experts stacked again) gives the
    exported model's parameters bit for bit, under names and shapes checked before anything is read."""
    cfg = moe_config(**FORMS[architecture])
    source = random_model(cfg)
    directory = export(source, cfg, tmp_path / "hf", tokenizer_model)
    weights = open_starting_weights(directory, get_model_spec("moe"), cfg)
    with torch.device("meta"):
        model = get_model_spec("moe").model_cls(cfg)
    materialize(model, torch.device("cpu"), seed=1234)
    weights.load([model])
    expected = source.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


def test_an_import_checks_values_the_shapes_cannot_show(tmp_path, tokenizer_model):
    """Qwen2-MoE's shared-expert gate has no counterpart unless it is zero: found when read, one line; a config.json
    of another expert count is named before."""
    cfg = moe_config(**FORMS["Qwen2MoeForCausalLM"])
    directory = export(random_model(cfg), cfg, tmp_path / "hf", tokenizer_model)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.1.mlp.shared_expert_gate.weight"] += 1
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    weights = open_starting_weights(directory, get_model_spec("moe"), cfg)
    with torch.device("meta"):
        model = get_model_spec("moe").model_cls(cfg)
    materialize(model, torch.device("cpu"), seed=1234)
    with pytest.raises(UserError, match="shared_expert_gate is not zero"):
        weights.load([model])
    with pytest.raises(UserError, match="num_experts=8 but the run has 4: set model.n_experts"):
        open_starting_weights(directory, get_model_spec("moe"), dataclasses.replace(cfg, n_experts=4))


def test_saved_rope_inverse_frequencies_import_as_without_them(tmp_path, tokenizer_model):
    """Each layer's RoPE inv_freq buffer (old exports saved it; transformers' values here) goes the Llama import's
    way (models/llm/hf.py): checked and dropped, the same parameters bit for bit; halved (a linear RoPE scaling the
    config.json does not state) it is refused when read."""
    cfg = moe_config()
    source = random_model(cfg)
    directory = export(source, cfg, tmp_path / "hf", tokenizer_model)
    hf_config = transformers.AutoConfig.for_model(**MoEAdapter().export_config(cfg, 64))
    inv_freq = transformers.AutoModelForCausalLM.from_config(hf_config).model.rotary_emb.inv_freq
    tensors = load_file(directory / "model.safetensors")
    for scale in (1, 0.5):
        save_file(tensors | {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq * scale
                             for i in range(cfg.n_layers)}, directory / "model.safetensors", metadata={"format": "pt"})
        weights = open_starting_weights(directory, get_model_spec("moe"), cfg)
        with torch.device("meta"):
            model = get_model_spec("moe").model_cls(cfg)
        materialize(model, torch.device("cpu"), seed=1234)
        if scale == 1:
            weights.load([model])
            expected = source.state_dict()
            assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
        else:
            with pytest.raises(UserError, match=r"inv_freq holds other RoPE inverse frequencies .* element 0 is 0\.5 "):
                weights.load([model])
