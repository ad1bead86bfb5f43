"""The deltanet family to flash-linear-attention's DeltaNetForCausalLM (models/deltanet/hf.py): a trained hybrid
exported by `convert to-hf` holds exactly its tensors under fla's names and layouts with a config.json that does
not depend on whether fla is installed; native -> fla -> native is bit-identical; what fla cannot express is
refused in one line naming the field. With fla importable, its model builds on the meta device with the same
names and shapes, and loads the export with no missing or unexpected tensors; and fla's model, its Triton kernels
replaced by fla's reference ops (it has no CPU kernels), computes our logits (and not with the short-conv kernels
reversed in time). The hybrid's softmax-attention layers are not run in fla (flash-attn has no CPU build)."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from launcher.checkpoint import Checkpointer, ModelState
from launcher.config import load_config
from launcher.convert import convert
from launcher.hf_files import write_hf_directory
from launcher.init_from import open_starting_weights
from launcher.trainer import train
from models import get_model_spec
from models.deltanet.hf import DeltaNetAdapter
from parallel.init import materialize
from tests.conftest import REPO, TEST_VOCAB, cached_tokenizer, tiny_overrides

transformers = pytest.importorskip("transformers")

SPEC = get_model_spec("deltanet")
FP32_TOLERANCE = 1e-5  # relative to the largest logit
FORMS = {"deltanet": {}, "hybrid": dict(attention_layers=[1], use_gate=True, n_kv_heads=2, rope_theta=5e5)}

# One block of each kind as fla 0.6.0 names and shapes it for dim 64, 4 heads, ffn 192, conv 4, read from
# fla/models/delta_net/modeling_delta_net.py (DeltaNetBlock), fla/layers/delta_net.py and fla/layers/attn.py;
# the fla tests below check the same against fla's own model where fla is installed.
FLA_DELTANET_BLOCK = {
    "attn_norm.weight": (64,), "attn.q_proj.weight": (64, 64), "attn.k_proj.weight": (64, 64),
    "attn.v_proj.weight": (64, 64), "attn.b_proj.weight": (4, 64), "attn.g_proj.weight": (64, 64),
    "attn.q_conv1d.weight": (64, 1, 4), "attn.k_conv1d.weight": (64, 1, 4), "attn.v_conv1d.weight": (64, 1, 4),
    "attn.o_norm.weight": (16,), "attn.o_proj.weight": (64, 64), "mlp_norm.weight": (64,),
    "mlp.gate_proj.weight": (192, 64), "mlp.up_proj.weight": (192, 64), "mlp.down_proj.weight": (64, 192)}
FLA_ATTENTION_BLOCK = {
    "attn_norm.weight": (64,), "attn.q_proj.weight": (64, 64), "attn.k_proj.weight": (32, 64),
    "attn.v_proj.weight": (32, 64), "attn.o_proj.weight": (64, 64), "mlp_norm.weight": (64,),
    "mlp.gate_proj.weight": (192, 64), "mlp.up_proj.weight": (192, 64), "mlp.down_proj.weight": (64, 192)}


def deltanet_config(**fields):
    return dataclasses.replace(SPEC.config_cls(), **{**dict(dim=64, n_layers=2, n_heads=4, vocab_size=TEST_VOCAB,
                                                            multiple_of=64), **fields})


def random_model(cfg) -> torch.nn.Module:
    with torch.device("meta"):
        model = SPEC.model_cls(cfg)
    materialize(model, torch.device("cpu"), 0)
    return model.eval()


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def expected_config_json(cfg, tokenizer_model: Path) -> dict:
    """What config.json must hold: the adapter's fields and the tokenizer's ids, nothing of fla's defaults."""
    from sentencepiece import SentencePieceProcessor
    sp = SentencePieceProcessor(model_file=str(tokenizer_model))
    token_ids = {f"{role}_token_id": i for role, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()),
                                                      ("pad", sp.pad_id())) if i >= 0}
    return {**DeltaNetAdapter().export_config(cfg, 32), **token_ids, "dtype": "float32",
            "transformers_version": transformers.__version__}


@pytest.mark.parametrize("form", FORMS)
def test_names_and_shapes_are_fla_s(form):
    cfg = deltanet_config(**{**FORMS[form], "use_gate": True})
    fla = shapes(DeltaNetAdapter().from_native(random_model(cfg).state_dict(), cfg))
    top = {"model.embeddings.weight": (TEST_VOCAB, 64), "model.norm.weight": (64,), "lm_head.weight": (TEST_VOCAB, 64)}
    blocks = {f"model.layers.{i}.{name}": shape for i in range(cfg.n_layers)
              for name, shape in (FLA_ATTENTION_BLOCK if i in cfg.attention_layers else FLA_DELTANET_BLOCK).items()}
    assert fla == {**top, **blocks}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_native_to_fla_and_back_is_bit_identical(form, tie_embeddings):
    cfg = deltanet_config(**FORMS[form], tie_embeddings=tie_embeddings)
    native = random_model(cfg).state_dict()
    fla = DeltaNetAdapter().from_native(native, cfg)
    assert ("lm_head.weight" in fla) != tie_embeddings
    back = DeltaNetAdapter().to_native(fla, cfg)
    assert back.keys() == native.keys()
    assert all(torch.equal(back[name], native[name]) for name in native)


@pytest.mark.parametrize("form", FORMS)
def test_an_fla_directory_imports_bit_for_bit(form, tmp_path, data_cache):
    """checkpoint.init_from an fla directory (a hybrid's attention layers told apart by the run's config): the
    exported model's parameters, bit for bit."""
    cfg = deltanet_config(**FORMS[form])
    source = random_model(cfg)
    adapter = DeltaNetAdapter()
    directory = tmp_path / "fla"
    directory.mkdir()
    write_hf_directory(directory, adapter.from_native(source.state_dict(), cfg), adapter.export_config(cfg, 32),
                       cached_tokenizer(data_cache), torch.float32)
    model = random_model(dataclasses.replace(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    open_starting_weights(directory, SPEC, cfg).load([model])
    expected = source.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("fields, message", [
    (dict(mixer_rule="linear"), "model field mixer_rule='linear' has no counterpart in fla's DeltaNetConfig"),
    (dict(dim=60, n_heads=8), "model field n_heads=8 does not divide dim=60"),
])
def test_what_fla_cannot_express_is_named_in_one_line(fields, message):
    with pytest.raises(ValueError, match=f"^{message}") as refused:
        DeltaNetAdapter().export_config(deltanet_config(**fields), 32)
    assert "\n" not in str(refused.value)


def test_a_field_the_export_does_not_map_is_named():
    @dataclasses.dataclass
    class WithQKNorm(SPEC.config_cls):
        qk_norm: bool = True

    with pytest.raises(ValueError, match="^model field qk_norm has no counterpart in fla's DeltaNetConfig$"):
        DeltaNetAdapter().export_config(WithQKNorm(vocab_size=TEST_VOCAB), 32)


def test_config_problems_name_the_run_s_key():
    cfg = deltanet_config()
    exported = DeltaNetAdapter().export_config(cfg, 32)
    assert DeltaNetAdapter().config_problems(exported, cfg) == []
    assert DeltaNetAdapter().config_problems({**exported, "conv_size": 3}, cfg) == [
        "config.json has conv_size=3 but the run has 4: set model.conv_size"]
    hybrid = deltanet_config(**FORMS["hybrid"])
    assert DeltaNetAdapter().config_problems(DeltaNetAdapter().export_config(hybrid, 32), hybrid) == []
    assert "config.json has attn={'layers': [1], 'num_heads': 4, 'num_kv_heads': 2, 'qkv_bias': False, " \
           "'window_size': None, 'rope_theta': 500000.0} but the run has None: set model.attention_layers / " \
           "model.n_heads / model.n_kv_heads / model.rope_theta" in DeltaNetAdapter().config_problems(
               DeltaNetAdapter().export_config(hybrid, 32), cfg)


@pytest.mark.usefixtures("in_process_runs")
def test_convert_to_hf_of_a_trained_hybrid(tmp_path, data_cache):
    """configs/deltanet/hybrid-tiny.yaml shrunk, trained 2 steps, exported: exactly its tensors (fp32, bitwise)
    under fla's names, and a config.json of the adapter's fields and the tokenizer's ids only."""
    run_dir = tmp_path / "run"
    train(load_config(REPO / "configs" / "deltanet" / "hybrid-tiny.yaml", tiny_overrides(
        run_dir, data_cache, "model.dim=64", "model.n_layers=2", "model.attention_layers=[1]", "model.multiple_of=64",
        "train.seq_len=32", "train.steps=2")))
    out = convert("to-hf", run_dir, tmp_path / "hf", log=lambda _: None)
    cfg = load_config(run_dir / "config.yaml")
    model_cfg = cfg.model_config()
    with torch.device("meta"):
        model = SPEC.model_cls(model_cfg)
    materialize(model, torch.device("cpu"), cfg.train.seed)
    dcp.load({"model": ModelState([model])}, checkpoint_id=Checkpointer(run_dir, 1, 0).latest_dir())
    expected = DeltaNetAdapter().from_native(model.state_dict(), model_cfg)
    written = load_file(out / "model.safetensors")
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[name], expected[name]) for name in expected)
    assert json.loads((out / "config.json").read_text()) == expected_config_json(model_cfg, cached_tokenizer(data_cache))


@pytest.fixture
def fla():
    """fla, importable on CPU (its kernels are Triton: it warns and falls back to CPU for what it can)."""
    return pytest.importorskip("fla")


@pytest.fixture
def fla_attention_constructs(fla, monkeypatch):
    """fla's softmax Attention refuses to construct without flash-attn, which has no CPU build; these tests
    only read parameters, so a placeholder stands in for the kernel it would call."""
    import fla.layers.attn
    monkeypatch.setattr(fla.layers.attn, "flash_attn_func", lambda *args, **kwargs: None)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.usefixtures("fla_attention_constructs")
def test_fla_builds_our_names_and_shapes(form):
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM
    cfg = deltanet_config(**FORMS[form])
    with torch.device("meta"):
        theirs = DeltaNetForCausalLM(DeltaNetConfig(**DeltaNetAdapter().export_config(cfg, 32)))
    assert shapes(DeltaNetAdapter().from_native(random_model(cfg).state_dict(), cfg)) == shapes(theirs.state_dict())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.usefixtures("fla_attention_constructs")
def test_fla_loads_the_export(form, tmp_path, data_cache):
    """AutoModelForCausalLM (fla registers delta_net on import) reads our config.json as fla's config and loads
    every tensor written, none missing, none unexpected, bit for bit."""
    cfg = deltanet_config(**FORMS[form])
    tensors = DeltaNetAdapter().from_native(random_model(cfg).state_dict(), cfg)
    out = tmp_path / "hf"
    out.mkdir()
    write_hf_directory(out, tensors, DeltaNetAdapter().export_config(cfg, 32), cached_tokenizer(data_cache),
                       torch.float32)
    assert json.loads((out / "config.json").read_text()) == expected_config_json(cfg, cached_tokenizer(data_cache))
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert type(theirs).__name__ == "DeltaNetForCausalLM" and not any(info.values()), info
    loaded = theirs.state_dict()
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)


def delta_rule_reference(q, k, v, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
                         **_):
    """fla's naive recurrence (fla/ops/delta_rule/naive.py) in the calling convention of its kernels: [B, T, H, D],
    q and k L2-normalized first as its l2norm kernel does (x / sqrt(sum x^2 + 1e-6))."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    if use_qk_l2norm_in_kernel:
        q, k = (x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    o, state = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)), initial_state, output_final_state)
    return o.transpose(1, 2), state


@pytest.fixture
def fla_on_cpu(fla, monkeypatch):
    """fla's model with each Triton kernel its DeltaNet forward calls replaced by fla's own reference (the naive
    delta rule, rms_norm_ref for o_norm and the gated o_norm) or by torch's (nn.Conv1d's convolution, with the
    causal padding fla's ShortConvolution sets; silu(gate) * up for swiglu). Block norms and the MLP take their
    unfused torch paths (fuse_norm, fuse_swiglu off: the same function)."""
    import torch.nn.functional as F

    import fla.layers.delta_net
    import fla.modules.mlp
    from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution
    from fla.modules.norm import layernorm, layernorm_gated

    def convolution(self, x, **_):
        y = self._conv_forward(x.transpose(1, 2), self.weight, self.bias)[..., :x.shape[1]].transpose(1, 2)
        return (F.silu(y) if self.activation in ("silu", "swish") else y), None

    monkeypatch.setattr(fla.layers.delta_net, "fused_recurrent_delta_rule", delta_rule_reference)
    monkeypatch.setattr(fla.layers.delta_net, "chunk_delta_rule", delta_rule_reference)
    monkeypatch.setattr(ShortConvolution, "forward", convolution)
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x, *_, **__: layernorm.rms_norm_ref(
        x, self.weight, self.bias, eps=self.eps))
    monkeypatch.setattr(FusedRMSNormGated, "forward", lambda self, x, g, *_, **__: layernorm_gated.rms_norm_ref(
        x, self.weight, self.bias, z=g, eps=self.eps))
    monkeypatch.setattr(fla.modules.mlp, "swiglu", lambda gate, up: F.silu(gate) * up)


def fla_relative_difference(cfg, tensors) -> float:
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM
    ours = random_model(cfg)
    theirs = DeltaNetForCausalLM(DeltaNetConfig(**DeltaNetAdapter().export_config(cfg, 32), fuse_norm=False,
                                                fuse_swiglu=False)).eval()
    theirs.load_state_dict(tensors, strict=True)
    tokens = torch.randint(0, TEST_VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits = ours(tokens)
        return ((theirs(tokens, use_cache=False).logits - ours_logits).abs().max() / ours_logits.abs().max()).item()


@pytest.mark.parametrize("use_gate", [False, True])
@pytest.mark.usefixtures("fla_on_cpu")
def test_fla_s_model_computes_our_logits_with_its_reference_ops(use_gate):
    cfg = deltanet_config(use_gate=use_gate, norm_eps=1e-6)
    assert fla_relative_difference(cfg, DeltaNetAdapter().from_native(random_model(cfg).state_dict(), cfg)) \
        <= FP32_TOLERANCE


@pytest.mark.usefixtures("fla_on_cpu")
def test_conv_weights_reversed_in_time_differ():
    """Negative control: the comparison above catches short-conv kernels laid out in the wrong time order."""
    cfg = deltanet_config()
    tensors = DeltaNetAdapter().from_native(random_model(cfg).state_dict(), cfg)
    tensors = {name: t.flip(-1) if name.endswith("conv1d.weight") else t for name, t in tensors.items()}
    assert fla_relative_difference(cfg, tensors) > 100 * FP32_TOLERANCE
