"""The `deltanet` family as flash-linear-attention's (fla's) `DeltaNetForCausalLM` (model_type "delta_net"):
parameter names, the short convolutions' weight layout, the RoPE layout of the softmax-attention layers of a
hybrid, and the config.

Read from fla 0.6.0 (fla/models/delta_net/, fla/layers/delta_net.py, fla/layers/attn.py): each block is
attn_norm -> attn -> mlp_norm -> mlp (GatedMLP: down(silu(gate x) * up x)); a DeltaNet `attn` is ours with
nn.Conv1d-shaped conv weights [C, 1, K] (ours [C, K]), q and k L2-normalized in the kernel with scale
head_dim^-1/2 as ours, and one o_norm gain over head_dim. The layers of the config's `attn` spec are fla's
softmax Attention (q/k/v/o_proj, no biases, rotate-half RoPE over the whole head), so wq/wk get the same row
permutation as the Llama export. What fla cannot express is refused: plain linear attention (fla's
use_beta=False is the delta rule with beta = 1) and heads that do not split dim evenly.
"""
import torch

from models.deltanet.model import DeltaNetConfig
from models.llm.hf import (HF_LAYER, LLAMA_FIELDS, NATIVE_LAYER, check_mapped, half_to_interleaved_rotation,
                           imported_field_problems, interleaved_to_half_rotation, rename, rope_rows)

FLA_CONFIG = "fla's DeltaNetConfig"

# native name in a block -> fla's; a DeltaNet layer's tensors and a softmax-attention layer's.
_BLOCK_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_DELTANET_NAMES = {
    **_BLOCK_NAMES,
    **{f"attention.{p}_proj.weight": f"attn.{p}_proj.weight" for p in "qkvbgo"},
    **{f"attention.{p}_conv.weight": f"attn.{p}_conv1d.weight" for p in "qkv"},
    "attention.o_norm.weight": "attn.o_norm.weight",
}
_ATTENTION_NAMES = {
    **_BLOCK_NAMES,
    **{f"attention.w{p}.weight": f"attn.{p}_proj.weight" for p in "qkvo"},
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embeddings.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_FLA_DELTANET_NAMES = {fla: native for native, fla in _DELTANET_NAMES.items()}
_FLA_ATTENTION_NAMES = {fla: native for native, fla in _ATTENTION_NAMES.items()}
_FLA_TOP_NAMES = {fla: native for native, fla in _TOP_NAMES.items()}

# Fields that map (or only shape the initialization, as for Llama). n_kv_heads and rope_theta count only in the
# softmax-attention layers; without any, they do not change the function.
DELTANET_FIELDS = LLAMA_FIELDS | {"conv_size", "use_gate", "allow_neg_eigval", "mixer_rule", "attention_layers"}

# config.json fields an import must match -> (the run's config key that sets it, DeltaNetConfig's default in fla).
_IMPORTED_FIELDS = {
    "hidden_size": ("model.dim", 2048), "num_hidden_layers": ("model.n_layers", 24),
    "num_heads": ("model.n_heads", 16), "expand_k": ("model.dim / model.n_heads", 1.0),
    "expand_v": ("model.dim / model.n_heads", 1.0), "intermediate_size": ("model.multiple_of / "
                                                                          "model.ffn_dim_multiplier", None),
    "vocab_size": ("data.vocab_size (the run's tokenizer)", 32000), "norm_eps": ("model.norm_eps", 1e-6),
    "tie_word_embeddings": ("model.tie_embeddings", False), "use_short_conv": ("model.conv_size", True),
    "conv_size": ("model.conv_size", 4), "use_gate": ("model.use_gate", False),
    "allow_neg_eigval": ("model.allow_neg_eigval", False), "use_beta": ("model.mixer_rule", True),
    "attn": ("model.attention_layers / model.n_heads / model.n_kv_heads / model.rope_theta", None),
    "qk_norm": ("(none: only l2 imports)", "l2"), "qk_activation": ("(none: only silu imports)", "silu"),
    "hidden_act": ("(none: only swish imports)", "swish"), "use_output_norm": ("(none: always on)", True),
    "attnres_block_size": ("(none: attention residuals do not import)", None),
}


class DeltaNetAdapter:
    """models.spec.StateDictAdapter for fla's DeltaNetForCausalLM. fla names a hybrid's softmax-attention and
    DeltaNet tensors alike (attn.{q,k,v,o}_proj): the config's attention_layers tell them apart."""

    def to_native(self, state_dict: dict[str, torch.Tensor], model_cfg: DeltaNetConfig) -> dict[str, torch.Tensor]:
        native = {}
        for name, tensor in state_dict.items():
            native_name = rename(name, HF_LAYER, "layers.{}.{}", _fla_names(name, model_cfg), _FLA_TOP_NAMES,
                                  "the deltanet model")
            if native_name.endswith("_conv.weight"):
                tensor = tensor.squeeze(1)  # [C, 1, K] -> [C, K]
            native[native_name] = rope_rows(native_name, tensor, model_cfg, half_to_interleaved_rotation)
        if model_cfg.tie_embeddings and "tok_embeddings.weight" in native:
            native["output.weight"] = native["tok_embeddings.weight"]
        return native

    def from_native(self, state_dict: dict[str, torch.Tensor], model_cfg: DeltaNetConfig) -> dict[str, torch.Tensor]:
        fla = {}
        for name, tensor in state_dict.items():
            if name == "output.weight" and model_cfg.tie_embeddings:
                continue  # fla ties lm_head to the embeddings itself (tie_word_embeddings)
            layer = NATIVE_LAYER.fullmatch(name)
            names = _ATTENTION_NAMES if layer and int(layer[1]) in model_cfg.attention_layers else _DELTANET_NAMES
            fla_name = rename(name, NATIVE_LAYER, "model.layers.{}.{}", names, _TOP_NAMES, "DeltaNetForCausalLM")
            if name.endswith("_conv.weight"):
                tensor = tensor.unsqueeze(1)  # nn.Conv1d's depthwise layout [C, 1, K]
            fla[fla_name] = rope_rows(name, tensor, model_cfg, interleaved_to_half_rotation)
        return fla

    def config_problems(self, config: dict, model_cfg: DeltaNetConfig) -> list[str]:
        try:
            ours = self.export_config(model_cfg, max_position_embeddings=0)
        except ValueError as e:
            return [str(e)]
        # Without a convolution its size does not count.
        fields = {key: hint for key, hint in _IMPORTED_FIELDS.items() if key != "conv_size" or ours["use_short_conv"]}
        return imported_field_problems(config, ours, fields)

    def export_config(self, model_cfg: DeltaNetConfig, max_position_embeddings: int) -> dict:
        check_mapped(model_cfg, DELTANET_FIELDS, FLA_CONFIG)
        if model_cfg.mixer_rule != "delta":
            raise ValueError(f"model field mixer_rule={model_cfg.mixer_rule!r} has no counterpart in {FLA_CONFIG} "
                             f"(its use_beta=false is the delta rule with beta 1, not linear attention)")
        if model_cfg.dim % model_cfg.n_heads:
            raise ValueError(f"model field n_heads={model_cfg.n_heads} does not divide dim={model_cfg.dim}; "
                             f"fla's layers take heads of hidden_size / num_heads")
        attn = None
        if model_cfg.attention_layers:
            attn = {"layers": sorted(model_cfg.attention_layers), "num_heads": model_cfg.n_heads,
                    "num_kv_heads": model_cfg.kv_heads, "qkv_bias": False, "window_size": None,
                    "rope_theta": model_cfg.rope_theta}
        # Every field that defines fla's function is written, defaults included, so that the file means the same
        # under another fla version's defaults.
        return {"model_type": "delta_net", "architectures": ["DeltaNetForCausalLM"],
                "vocab_size": model_cfg.vocab_size, "hidden_size": model_cfg.dim,
                "num_hidden_layers": model_cfg.n_layers, "num_heads": model_cfg.n_heads,
                "expand_k": 1.0, "expand_v": 1.0, "intermediate_size": model_cfg.ffn_hidden_dim,
                "hidden_act": "swish", "norm_eps": model_cfg.norm_eps,
                "use_short_conv": model_cfg.conv_size > 1, "conv_size": model_cfg.conv_size,
                "use_gate": model_cfg.use_gate, "allow_neg_eigval": model_cfg.allow_neg_eigval, "use_beta": True,
                "use_output_norm": True, "qk_norm": "l2", "qk_activation": "silu", "attn": attn,
                "attnres_block_size": None, "max_position_embeddings": max_position_embeddings,
                "tie_word_embeddings": model_cfg.tie_embeddings, "initializer_range": model_cfg.init_std}


def _fla_names(name: str, model_cfg: DeltaNetConfig) -> dict[str, str]:
    """fla name in a block -> native, for the layer that `name` (an fla name) is in."""
    layer = HF_LAYER.fullmatch(name)
    if layer and int(layer[1]) in model_cfg.attention_layers:
        return _FLA_ATTENTION_NAMES
    return _FLA_DELTANET_NAMES

