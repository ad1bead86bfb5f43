"""The `moe` family as a Hugging Face MoE class: MixtralForCausalLM, Qwen2MoeForCausalLM or Glm4MoeForCausalLM,
the first that expresses the config (checked to fp32 rounding, see tests/unit/test_hf_moe.py).

- Mixtral: softmax router, renormalized top-k, route_scale 1, no shared experts, every layer MoE.
- Qwen2-MoE: the other softmax routers without group limits or scale (norm_topk_prob = renormalize), with
  shared experts and/or dense first layers (mlp_only_layers). Its shared expert has a sigmoid gate this
  family lacks: gate weight 0 (sigmoid 0.5) with the shared down projection doubled is exact.
- Glm4-MoE: the sigmoid router (groups, route_scale, selection bias as e_score_correction_bias, shared
  experts, dense first layers), with full-width RoPE and no q/k norm.
Refused (no transformers class computes them): token dropping, a softmax router with a selection bias,
group limits or a route scale.

Attention, norms, embeddings and dense layers map as Llama's (models/llm/hf.py). Experts are written one
nn.Linear per expert, as published checkpoints of these classes hold them; transformers stacks them into
its fused gate_up_proj / down_proj when loading.
"""
import re
from dataclasses import dataclass

import torch

from models.llm.hf import (IMPORTED_FIELDS, HF_LAYER, LLAMA_FIELDS, NATIVE_LAYER, LlamaAdapter, as_transformers_reads,
                           check_mapped, decoder_config, imported_field_problems)
from models.moe.model import MoEConfig

MOE_FIELDS = {"n_experts", "top_k", "moe_hidden_dim", "n_shared_experts", "n_dense_layers", "router", "renormalize",
              "route_scale", "n_groups", "topk_groups", "capacity_factor", "aux_loss_coef", "z_loss_coef",
              "bias_update_rate"}
_SWIGLU = ("w1", "w3", "w2")  # gate, up, down: the order of `_Form.expert`


@dataclass(frozen=True)
class _Form:
    model_type: str
    architecture: str
    block: str  # the MoE module of an HF layer
    expert: tuple[str, str, str]  # an expert's gate, up and down projection
    shared: str | None = None  # the shared experts' module; None: the class has none
    shared_gate: bool = False  # a sigmoid gate scales the shared experts (exported 0: x 0.5)
    selection_bias: bool = False  # the router adds e_score_correction_bias to its scores for the choice


MIXTRAL = _Form("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"))
QWEN2_MOE = _Form("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert",
                  shared_gate=True)
GLM4_MOE = _Form("glm4_moe", "Glm4MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts",
                 selection_bias=True)


def hf_form(cfg: MoEConfig) -> _Form:
    """The first HF class that computes what `cfg` does; ValueError naming the field none can express."""
    if cfg.capacity_factor > 0:
        raise ValueError("model field capacity_factor > 0 (token dropping) has no counterpart in transformers")
    if cfg.router == "sigmoid":
        return GLM4_MOE
    if cfg.bias_update_rate > 0:
        raise ValueError("model field bias_update_rate > 0 (a selection bias on the softmax router) has no "
                         "counterpart in transformers")
    if cfg.route_scale != 1:
        raise ValueError("model field route_scale != 1 on the softmax router has no counterpart in transformers")
    if cfg.topk_groups < cfg.n_groups:
        raise ValueError("model field n_groups > 1 (group-limited softmax routing) has no counterpart in transformers")
    return MIXTRAL if cfg.renormalize and not cfg.n_shared_experts and not cfg.n_dense_layers else QWEN2_MOE


def _split(state_dict: dict[str, torch.Tensor], layer_pattern: re.Pattern, block: str, cfg: MoEConfig):
    """(the tensors of each MoE layer's `block` by layer and name inside it, all other tensors)."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    rest = {}
    for name, tensor in state_dict.items():
        layer = layer_pattern.fullmatch(name)
        if layer and int(layer[1]) >= cfg.n_dense_layers and layer[2].startswith(block + "."):
            layers.setdefault(int(layer[1]), {})[layer[2][len(block) + 1:]] = tensor
        else:
            rest[name] = tensor
    return layers, rest


# config.json fields of the MoE classes an import must match -> the run's config key that sets it.
_MOE_HINTS = {
    "num_local_experts": "model.n_experts", "num_experts": "model.n_experts", "n_routed_experts": "model.n_experts",
    "num_experts_per_tok": "model.top_k", "moe_intermediate_size": "model.moe_hidden_dim",
    "intermediate_size": "model.multiple_of / model.ffn_dim_multiplier (the dense layers' width)",
    "norm_topk_prob": "model.renormalize", "shared_expert_intermediate_size": "model.n_shared_experts",
    "n_shared_experts": "model.n_shared_experts", "mlp_only_layers": "model.n_dense_layers",
    "first_k_dense_replace": "model.n_dense_layers", "routed_scaling_factor": "model.route_scale",
    "n_group": "model.n_groups", "topk_group": "model.topk_groups", "decoder_sparse_step": "(none: only 1 imports)",
    "qkv_bias": "(none: no biases import)", "attention_bias": "(none: no biases import)",
    "partial_rotary_factor": "(none: only 1.0 imports)", "use_qk_norm": "(none: only false imports)",
}


def _nonzero(tensor: torch.Tensor) -> bool:
    """Whether a tensor that must be zero is not; a meta tensor (an import mapping shapes only) passes: its values
    are checked when read."""
    return not tensor.is_meta and bool(tensor.any())


class MoEAdapter:
    """models.spec.StateDictAdapter for the HF class `hf_form` picks."""

    def from_native(self, state_dict: dict[str, torch.Tensor], model_cfg: MoEConfig) -> dict[str, torch.Tensor]:
        form = hf_form(model_cfg)
        layers, rest = _split(state_dict, NATIVE_LAYER, "feed_forward", model_cfg)
        hf = LlamaAdapter().from_native(rest, model_cfg)
        for i, tensors in layers.items():
            hf.update({f"model.layers.{i}.{form.block}.{name}": t
                       for name, t in self._layer_from_native(tensors, form, model_cfg).items()})
        return hf

    def to_native(self, state_dict: dict[str, torch.Tensor], model_cfg: MoEConfig) -> dict[str, torch.Tensor]:
        form = hf_form(model_cfg)
        layers, rest = _split(state_dict, HF_LAYER, form.block, model_cfg)
        native = LlamaAdapter().to_native(rest, model_cfg)
        for i, tensors in layers.items():
            native.update({f"layers.{i}.feed_forward.{name}": t
                           for name, t in self._layer_to_native(tensors, form, model_cfg).items()})
        return native

    def config_problems(self, config: dict, model_cfg: MoEConfig) -> list[str]:
        try:
            ours = self.export_config(model_cfg, max_position_embeddings=0)
        except ValueError as e:
            return [str(e)]
        fields = {key: hint for key, hint in IMPORTED_FIELDS.items() if key in ours and key not in _MOE_HINTS}
        fields |= {key: (hint, None) for key, hint in _MOE_HINTS.items() if key in ours}
        if hf_form(model_cfg) is MIXTRAL:
            fields["intermediate_size"] = ("model.moe_hidden_dim", None)
        return imported_field_problems(config, ours, fields, as_transformers_reads)

    @staticmethod
    def _layer_from_native(native: dict[str, torch.Tensor], form: _Form, cfg: MoEConfig) -> dict[str, torch.Tensor]:
        gate = native["router.gate.weight"]
        hf = {"gate.weight": gate}
        if form.selection_bias:
            # Used for the choice only when it is being trained; a resting bias would still shift the choice in HF.
            bias = native["router.expert_bias"]
            hf["gate.e_score_correction_bias"] = bias if cfg.bias_update_rate > 0 else torch.zeros_like(bias)
        for ours, theirs in zip(_SWIGLU, form.expert):
            for e, weight in enumerate(native[f"experts.{ours}"]):
                hf[f"experts.{e}.{theirs}.weight"] = weight.t().contiguous()  # [d, h] -> nn.Linear's [h, d]
        if form.shared:
            # Without shared experts the class still has the module, of width 0.
            empty = {"w1": gate.new_zeros(0, cfg.dim), "w3": gate.new_zeros(0, cfg.dim), "w2": gate.new_zeros(cfg.dim, 0)}
            for ours, theirs in zip(_SWIGLU, form.expert):
                weight = native.get(f"shared.{ours}.weight", empty[ours])
                hf[f"{form.shared}.{theirs}.weight"] = weight * 2 if form.shared_gate and ours == "w2" else weight
            if form.shared_gate:
                hf["shared_expert_gate.weight"] = gate.new_zeros(1, cfg.dim)
        return hf

    @staticmethod
    def _layer_to_native(hf: dict[str, torch.Tensor], form: _Form, cfg: MoEConfig) -> dict[str, torch.Tensor]:
        hf = dict(hf)

        def take(name: str) -> torch.Tensor:
            if name not in hf:
                raise ValueError(f"tensor {form.block}.{name} is missing for {form.architecture}")
            return hf.pop(name)

        gate = take("gate.weight")
        native = {"router.gate.weight": gate}
        bias = take("gate.e_score_correction_bias") if form.selection_bias else torch.zeros(cfg.n_experts,
                                                                                              dtype=gate.dtype)
        if cfg.bias_update_rate == 0 and _nonzero(bias):
            raise ValueError("the router's e_score_correction_bias is not zero but model field bias_update_rate is 0 "
                             "(a selection bias that is not trained)")
        native["router.expert_bias"] = bias
        for ours, theirs in zip(_SWIGLU, form.expert):
            native[f"experts.{ours}"] = torch.stack([take(f"experts.{e}.{theirs}.weight").t()
                                                     for e in range(cfg.n_experts)])
        if form.shared:
            shared = {ours: take(f"{form.shared}.{theirs}.weight") for ours, theirs in zip(_SWIGLU, form.expert)}
            if form.shared_gate:
                if _nonzero(take("shared_expert_gate.weight")):
                    raise ValueError("shared_expert_gate is not zero: a gated shared expert has no counterpart in "
                                     "the moe model")
                shared["w2"] = shared["w2"] / 2
            if cfg.n_shared_experts:
                native.update({f"shared.{ours}.weight": weight for ours, weight in shared.items()})
        if hf:
            raise ValueError(f"tensor {form.block}.{next(iter(hf))} has no counterpart in the moe model")
        return native

    def export_config(self, cfg: MoEConfig, max_position_embeddings: int) -> dict:
        form = hf_form(cfg)
        check_mapped(cfg, LLAMA_FIELDS | MOE_FIELDS, f"{form.architecture[:-len('ForCausalLM')]}Config")
        config = {"model_type": form.model_type, "architectures": [form.architecture],
                  **decoder_config(cfg, max_position_embeddings), "num_experts_per_tok": cfg.top_k}
        if form is MIXTRAL:
            return {**config, "num_local_experts": cfg.n_experts, "intermediate_size": cfg.expert_hidden_dim}
        moe = {"intermediate_size": cfg.ffn_hidden_dim, "moe_intermediate_size": cfg.expert_hidden_dim}
        if form is QWEN2_MOE:
            return {**config, **moe, "num_experts": cfg.n_experts, "norm_topk_prob": cfg.renormalize,
                    "shared_expert_intermediate_size": cfg.n_shared_experts * cfg.expert_hidden_dim,
                    "mlp_only_layers": list(range(min(cfg.n_dense_layers, cfg.n_layers))), "decoder_sparse_step": 1,
                    "qkv_bias": False}
        return {**config, **moe, "n_routed_experts": cfg.n_experts, "n_shared_experts": cfg.n_shared_experts,
                "first_k_dense_replace": cfg.n_dense_layers, "norm_topk_prob": True,
                "routed_scaling_factor": cfg.route_scale, "n_group": cfg.n_groups, "topk_group": cfg.topk_groups,
                "partial_rotary_factor": 1.0, "use_qk_norm": False, "attention_bias": False}
