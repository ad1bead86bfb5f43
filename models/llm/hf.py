"""The `llm` family as Hugging Face's `LlamaForCausalLM`: parameter names, the RoPE layout of wq/wk,
and the config.

Both models compute the same function given this mapping (checked to fp32 rounding, see
tests/unit/test_hf.py). The one layout difference: RoPE here rotates interleaved pairs
(x[2i], x[2i+1]) of each head, HF rotates halves (x[i], x[i + head_dim/2]); permuting the rows of
wq and wk within each head (as HF's own convert_llama_weights_to_hf.py does) makes the two agree.
"""
import re

import torch

from models.common.rope import inverse_frequencies
from models.llm.model import LLMConfig
from models.spec import architecture

# native name pattern -> HF name pattern; {i} is the layer index.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
NATIVE_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Each attention layer's RoPE inverse frequencies, a buffer that exports of transformers < 4.31 saved (old Llama
# checkpoints hold them); derived from config.json, so transformers ignores them on load.
HF_INV_FREQ = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_HF_LAYER_NAMES = {hf: native for native, hf in _LAYER_NAMES.items()}
_HF_TOP_NAMES = {hf: native for native, hf in _TOP_NAMES.items()}

# Fields that only shape the initialization (or ffn_hidden_dim, which maps): the exported function does not
# depend on them beyond what the mapped fields say.
LLAMA_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "tie_embeddings", "init_std", "scaled_residual_init", "ffn_hidden_dims"}


# config.json fields an import must match -> (the run's config key that sets it, the value when the config class
# leaves it None, as Mixtral's head_dim; a callable takes the config). Checked, as transformers reads config.json
# (as_transformers_reads), for equality with what export_config writes for the run's model.
IMPORTED_FIELDS = {
    "hidden_size": ("model.dim", 4096), "num_hidden_layers": ("model.n_layers", 32),
    "num_attention_heads": ("model.n_heads", 32),
    "num_key_value_heads": ("model.n_kv_heads", lambda c: c.get("num_attention_heads", 32)),
    "head_dim": ("model.dim / model.n_heads", lambda c: c.get("hidden_size", 4096) // c.get("num_attention_heads", 32)),
    "intermediate_size": ("model.multiple_of / model.ffn_dim_multiplier", 11008),
    "vocab_size": ("data.vocab_size (the run's tokenizer)", 32000), "rms_norm_eps": ("model.norm_eps", 1e-6),
    "rope_parameters": ("model.rope_theta (only unscaled, default RoPE imports)", None),
    "tie_word_embeddings": ("model.tie_embeddings", False),
    "hidden_act": ("(none: only silu imports)", "silu"), "attention_bias": ("(none: no biases import)", False),
    "mlp_bias": ("(none: no biases import)", False),
}


def _hf_value(hf_config: dict, key: str, default):
    """A config.json field as export_config writes it; rope_parameters also from transformers 4's rope_theta and
    rope_scaling. transformers 5 keeps partial_rotary_factor (Glm4-MoE's) inside rope_parameters."""
    rope = hf_config.get("rope_parameters") or {}
    if key == "partial_rotary_factor" and key not in hf_config and key in rope:
        return rope[key]
    if key == "rope_parameters" and key in hf_config:
        return {k: v for k, v in rope.items() if k != "partial_rotary_factor"}
    if key == "rope_parameters":
        scaling = hf_config.get("rope_scaling") or {}
        return {"rope_type": scaling.get("rope_type", scaling.get("type", "default")),
                "rope_theta": hf_config.get("rope_theta", 10000.0), **{k: v for k, v in scaling.items()
                                                                       if k not in ("type", "rope_type")}}
    if key in hf_config:
        return hf_config[key]
    return default(hf_config) if callable(default) else default


def rename(name: str, layer_pattern: re.Pattern, layer_format: str, layer_names: dict[str, str],
            top_names: dict[str, str], target: str) -> str:
    """`name` in the other format: a layer's parameter (layer_pattern: index, name in the layer) or a top one."""
    if (layer := layer_pattern.fullmatch(name)) and layer[2] in layer_names:
        return layer_format.format(layer[1], layer_names[layer[2]])
    if name in top_names:
        return top_names[name]
    raise ValueError(f"tensor {name} has no counterpart in {target}")


def check_inverse_frequencies(name: str, tensor: torch.Tensor, cfg: LLMConfig) -> None:
    """ValueError naming `name` unless the saved RoPE buffer holds the inverse frequencies of the run's RoPE, which
    config_problems has made config.json's (default RoPE, rope_theta = model.rope_theta, rotary_dim of each head's
    dims). Values are compared as rounded to the buffer's dtype (old exports saved it in fp16 or bf16), within a few
    of its ulps (computed elsewhere, e.g. on a GPU); a meta tensor (an import mapping shapes only) passes on its
    shape, its values are checked when read. A checkpoint trained with another RoPE than its config.json says
    (another theta, a scaling) differs by far more."""
    ours = f"config.json's RoPE (rope_theta={cfg.rope_theta:g}, default, over {cfg.rotary_dim} dims of each head)"
    expected = inverse_frequencies(cfg.rotary_dim, cfg.rope_theta)
    if tuple(tensor.shape) != tuple(expected.shape) or not tensor.dtype.is_floating_point:
        raise ValueError(f"tensor {name} is {tensor.dtype} of shape {list(tensor.shape)}, but {ours} has "
                         f"{expected.numel()} inverse frequencies: the checkpoint does not match its config.json")
    if tensor.is_meta:
        return
    finfo = torch.finfo(tensor.dtype)
    saved, expected = tensor.float(), expected.to(tensor.dtype).float()
    wrong = ((saved - expected).abs() > 4 * finfo.eps * expected.abs() + finfo.smallest_normal * finfo.eps).nonzero()
    if len(wrong):
        i = int(wrong[0, 0])
        raise ValueError(f"tensor {name} holds other RoPE inverse frequencies than {ours}: element {i} is "
                         f"{saved[i].item():.6g} where it gives {expected[i].item():.6g}, so the checkpoint was "
                         f"trained with another RoPE than its config.json says; correct config.json's rope_theta / "
                         f"rope_scaling to the RoPE it was trained with")


def interleaved_to_half_rotation(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk for interleaved-pair RoPE -> rows for HF's rotate_half RoPE, within each head."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved_rotation(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_half_rotation."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_rows(native_name: str, tensor: torch.Tensor, cfg: LLMConfig, permute) -> torch.Tensor:
    """`tensor` with the rows of wq/wk permuted (one of the two functions above); any other tensor as it is."""
    if native_name.endswith("attention.wq.weight"):
        return permute(tensor, cfg.n_heads)
    if native_name.endswith("attention.wk.weight"):
        return permute(tensor, cfg.kv_heads)
    return tensor


class LlamaAdapter:
    """models.spec.StateDictAdapter for Hugging Face's LlamaForCausalLM."""

    def to_native(self, state_dict: dict[str, torch.Tensor], model_cfg: LLMConfig) -> dict[str, torch.Tensor]:
        native = {}
        for name, tensor in state_dict.items():
            if HF_INV_FREQ.fullmatch(name):
                check_inverse_frequencies(name, tensor, model_cfg)
                continue  # derived from config.json: no parameter of the model
            native_name = rename(name, HF_LAYER, "layers.{}.{}", _HF_LAYER_NAMES, _HF_TOP_NAMES, "shardwright's model")
            native[native_name] = rope_rows(native_name, tensor, model_cfg, half_to_interleaved_rotation)
        if model_cfg.tie_embeddings and "tok_embeddings.weight" in native:
            native["output.weight"] = native["tok_embeddings.weight"]
        return native

    def from_native(self, state_dict: dict[str, torch.Tensor], model_cfg: LLMConfig) -> dict[str, torch.Tensor]:
        hf = {}
        for name, tensor in state_dict.items():
            if name == "output.weight" and model_cfg.tie_embeddings:
                continue  # HF ties lm_head to embed_tokens itself (tie_word_embeddings)
            hf_name = rename(name, NATIVE_LAYER, "model.layers.{}.{}", _LAYER_NAMES, _TOP_NAMES, "LlamaForCausalLM")
            hf[hf_name] = rope_rows(name, tensor, model_cfg, interleaved_to_half_rotation)
        return hf

    def config_problems(self, config: dict, model_cfg: LLMConfig) -> list[str]:
        try:
            ours = self.export_config(model_cfg, max_position_embeddings=0)
        except ValueError as e:
            return [str(e)]
        return imported_field_problems(config, ours, IMPORTED_FIELDS, as_transformers_reads)

    def export_config(self, model_cfg: LLMConfig, max_position_embeddings: int) -> dict:
        check_mapped(model_cfg, LLAMA_FIELDS, "LlamaConfig")
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                **decoder_config(model_cfg, max_position_embeddings),
                "intermediate_size": uniform_ffn_dim(model_cfg, "LlamaConfig"),
                "attention_bias": False, "mlp_bias": False}


def as_transformers_reads(config: dict) -> dict:
    """config.json as transformers builds its config class from it: the class's own defaults for what it omits (a
    Mixtral's rope_theta is 1e6, not Llama's 1e4), transformers 4's rope_theta and rope_scaling merged into
    rope_parameters as transformers 5 does (a rope_scaling beside rope_parameters included); fields left None
    (computed by the model, e.g. head_dim) are left out. ValueError when transformers cannot build it."""
    from transformers import AutoConfig

    try:
        built = AutoConfig.for_model(**config)
    except Exception as e:  # transformers raises what the class's __init__ raises
        raise ValueError(f"transformers cannot read config.json as a {config.get('model_type')} config "
                         f"({type(e).__name__}: {e})") from None
    return {key: value for key, value in built.to_dict().items() if value is not None}


def imported_field_problems(config: dict, ours: dict, fields: dict[str, tuple], read=lambda config: config
                            ) -> list[str]:
    """config.json against what export_config writes for the run's model (`ours`): its model_type, then each of
    `fields` (HF key -> (the run's config key that sets it, the HF default when absent)) as `read`
    (as_transformers_reads for a transformers class) gives them."""
    if config.get("model_type") != ours["model_type"]:
        return [f"config.json has model_type {config.get('model_type')!r}; this run's model imports "
                f"{ours['model_type']!r}"]
    try:
        config = read(config)
    except ImportError:
        return ["reading a Hugging Face config.json needs transformers: pip install 'shardwright[hf]'"]
    except ValueError as e:
        return [str(e)]
    problems = []
    for hf_key, (config_key, default) in fields.items():
        theirs = _hf_value(config, hf_key, default)
        if theirs != ours[hf_key]:
            problems.append(f"config.json has {hf_key}={theirs} but the run has {ours[hf_key]}: set {config_key}")
    return problems


def uniform_ffn_dim(model_cfg: LLMConfig, target: str) -> int:
    """The FFN hidden size every layer shares; ValueError when ffn_hidden_dims gives the layers different ones."""
    sizes = set(model_cfg.layer_ffn_dims())
    if len(sizes) > 1:
        raise ValueError(f"model.ffn_hidden_dims={model_cfg.ffn_hidden_dims} differ between layers; {target} has one "
                         f"FFN size for every layer")
    return sizes.pop()


def check_mapped(model_cfg: LLMConfig, mapped_fields: set[str], hf_config: str) -> None:
    """Refuse a config with a field the export does not map (a field added later must be mapped to export)."""
    unmapped = sorted(set(architecture(model_cfg)) - mapped_fields)
    if unmapped:
        raise ValueError(f"model field {unmapped[0]} has no counterpart in {hf_config}")


def decoder_config(model_cfg: LLMConfig, max_position_embeddings: int) -> dict:
    """config.json fields of the Llama decoder around the feed-forward layers, shared by the HF classes built
    on it (the MoE ones: models/moe/hf.py)."""
    return {"vocab_size": model_cfg.vocab_size, "hidden_size": model_cfg.dim, "num_hidden_layers": model_cfg.n_layers,
            "num_attention_heads": model_cfg.n_heads, "num_key_value_heads": model_cfg.kv_heads,
            "head_dim": model_cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": model_cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": model_cfg.rope_theta},
            "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": model_cfg.tie_embeddings,
            "initializer_range": model_cfg.init_std}
