"""The `llm` family as Megatron-Core's `GPTModel` (local or Transformer Engine layer spec, RMSNorm, SwiGLU, RoPE,
no biases): parameter names, the fused layouts, and the model config.

Names are Megatron's per layer, as its dist checkpoints key them (`decoder.layers.{i}.…`; the checkpoint stacks the
layers on a leading axis, which launcher/megatron_import.py and `convert to-megatron` handle). With either spec the
checkpoint keys the pre-norms by Transformer Engine's names (`linear_qkv.layer_norm_weight`,
`linear_fc1.layer_norm_weight`). Two fused tensors per layer:

    self_attention.linear_qkv.weight: per query group, [ng, (np/ng + 2) * hn, hidden]: the group's queries, then its
        key, then its value (Megatron's get_query_key_value_tensors splits it so);
    mlp.linear_fc1.weight: cat([gate, up]) (Megatron's SwiGLU chunks its output in two, silu on the first).

RoPE: Megatron rotates halves (rotary_interleaved=False, its default), as HF does, so wq/wk rows are permuted within
each head exactly as for Hugging Face (models/llm/hf.py).
"""
import re

import torch

from models.llm.hf import (LLAMA_FIELDS, NATIVE_LAYER, check_mapped, half_to_interleaved_rotation,
                           interleaved_to_half_rotation, rename, uniform_ffn_dim)
from models.llm.model import LLMConfig

# native name in a layer -> Megatron's, for the tensors that are not fused.
_LAYER_NAMES = {
    "attention.wo.weight": "self_attention.linear_proj.weight",
    "feed_forward.w2.weight": "mlp.linear_fc2.weight",
    "attention_norm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "ffn_norm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "embedding.word_embeddings.weight", "norm.weight": "decoder.final_layernorm.weight",
              "output.weight": "output_layer.weight"}
QKV, FC1 = "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"
_FUSED = {QKV: ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
          FC1: ("feed_forward.w1.weight", "feed_forward.w3.weight")}
_MEGATRON_LAYER_NAMES = {megatron: native for native, megatron in _LAYER_NAMES.items()}
_MEGATRON_TOP_NAMES = {megatron: native for native, megatron in _TOP_NAMES.items()}
MEGATRON_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def split_qkv(qkv: torch.Tensor, cfg: LLMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused per-group [q..., k, v] rows -> (wq, wk, wv) rows, heads in order (query head h in group
    h // (n_heads / kv_heads), as grouped-query attention pairs them)."""
    per_group = cfg.n_heads // cfg.kv_heads * cfg.head_dim
    groups = qkv.view(cfg.kv_heads, per_group + 2 * cfg.head_dim, -1)
    q, k, v = groups.split([per_group, cfg.head_dim, cfg.head_dim], dim=1)
    return (t.reshape(-1, qkv.shape[-1]) for t in (q, k, v))


def fuse_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, cfg: LLMConfig) -> torch.Tensor:
    """The inverse of split_qkv."""
    hidden = wq.shape[-1]
    groups = (wq.view(cfg.kv_heads, -1, hidden), wk.view(cfg.kv_heads, -1, hidden), wv.view(cfg.kv_heads, -1, hidden))
    return torch.cat(groups, dim=1).reshape(-1, hidden)


class MegatronGPTAdapter:
    """models.spec.StateDictAdapter for Megatron-Core's GPTModel, keyed "megatron". It maps any subset of layers
    (an import maps one layer at a time); fused tensors split into several native ones."""

    def to_native(self, state_dict: dict[str, torch.Tensor], model_cfg: LLMConfig) -> dict[str, torch.Tensor]:
        native = {}
        for name, tensor in state_dict.items():
            layer = MEGATRON_LAYER.fullmatch(name)
            if layer and layer[2] == QKV:
                wq, wk, wv = split_qkv(tensor, model_cfg)
                native.update(zip((f"layers.{layer[1]}.{n}" for n in _FUSED[QKV]),
                                  (half_to_interleaved_rotation(wq, model_cfg.n_heads),
                                   half_to_interleaved_rotation(wk, model_cfg.kv_heads), wv)))
            elif layer and layer[2] == FC1:
                native.update(zip((f"layers.{layer[1]}.{n}" for n in _FUSED[FC1]), tensor.chunk(2)))
            else:
                native[rename(name, MEGATRON_LAYER, "layers.{}.{}", _MEGATRON_LAYER_NAMES, _MEGATRON_TOP_NAMES,
                              "the llm model")] = tensor
        if model_cfg.tie_embeddings and "tok_embeddings.weight" in native:
            native["output.weight"] = native["tok_embeddings.weight"]
        return native

    def from_native(self, state_dict: dict[str, torch.Tensor], model_cfg: LLMConfig) -> dict[str, torch.Tensor]:
        megatron = {}
        for name, tensor in state_dict.items():
            layer = NATIVE_LAYER.fullmatch(name)
            if name == "output.weight" and model_cfg.tie_embeddings:
                continue  # GPTModel(share_embeddings_and_output_weights=True) has no output_layer in its checkpoint
            if layer and layer[2] in _FUSED[QKV] + _FUSED[FC1]:
                continue  # fused below, with the layer's other parts
            megatron[rename(name, NATIVE_LAYER, "decoder.layers.{}.{}", _LAYER_NAMES, _TOP_NAMES,
                            "Megatron-Core's GPTModel")] = tensor
        for i in range(model_cfg.n_layers):
            parts = {fused: [state_dict.get(f"layers.{i}.{n}") for n in names] for fused, names in _FUSED.items()}
            if all(t is not None for t in parts[QKV]):
                wq, wk, wv = parts[QKV]
                megatron[f"decoder.layers.{i}.{QKV}"] = fuse_qkv(
                    interleaved_to_half_rotation(wq, model_cfg.n_heads),
                    interleaved_to_half_rotation(wk, model_cfg.kv_heads), wv, model_cfg)
            if all(t is not None for t in parts[FC1]):
                megatron[f"decoder.layers.{i}.{FC1}"] = torch.cat(parts[FC1])
        return megatron

    def config_problems(self, config: dict, model_cfg: LLMConfig) -> list[str]:
        """`config`: the GPTModel arguments `convert to-megatron` records (gpt_config.json), field by field against
        what the run's model exports to."""
        try:
            ours = self.export_config(model_cfg, max_position_embeddings=0)
        except ValueError as e:
            return [str(e)]
        return [f"gpt_config.json has {key}={config.get(key)} but the run has {value}" for key, value in ours.items()
                if key != "max_sequence_length" and config.get(key) != value]

    def export_config(self, model_cfg: LLMConfig, max_position_embeddings: int) -> dict:
        """Megatron-Core's TransformerConfig fields and GPTModel arguments of the same model (activation_func by
        name: torch.nn.functional.silu)."""
        check_mapped(model_cfg, LLAMA_FIELDS, "Megatron-Core's GPTModel")
        return {"num_layers": model_cfg.n_layers, "hidden_size": model_cfg.dim,
                "num_attention_heads": model_cfg.n_heads, "num_query_groups": model_cfg.kv_heads,
                "kv_channels": model_cfg.head_dim, "ffn_hidden_size": uniform_ffn_dim(model_cfg, "Megatron-Core's GPTModel"),
                "gated_linear_unit": True, "activation_func": "silu", "normalization": "RMSNorm",
                "layernorm_epsilon": model_cfg.norm_eps, "add_bias_linear": False, "add_qkv_bias": False,
                "vocab_size": model_cfg.vocab_size, "max_sequence_length": max_position_embeddings,
                "position_embedding_type": "rope", "rotary_base": model_cfg.rope_theta, "rotary_percent": 1.0,
                "rotary_interleaved": False, "share_embeddings_and_output_weights": model_cfg.tie_embeddings}
