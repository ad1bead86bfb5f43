"""SOLO starts from a language model, as SOLO-7B starts from Mistral-7B: `checkpoint.init_from` an `llm` run's
checkpoint (ModelSpec.starts_from) or a Hugging Face Llama directory (the "hf" adapter) fills the LLM's
parameters; the embedding and the head gain the four image-markup rows, each the mean of the text rows (so the
new tokens start as an average token), and the patch projection starts at zero. With a zero projection
and text-only input the model computes the language model's logits on the text ids (tests/unit/test_solo.py).
"""
import torch

from data.images import PATCH_VALUES
from models.llm.hf import LlamaAdapter
from models.solo.model import SOLOConfig

NO_EXPORT = "a SOLO model's patch projection and image tokens have no place in a Hugging Face LlamaForCausalLM"
VOCABULARY_ROWS = ("tok_embeddings.weight", "output.weight")


def from_language_model(state_dict: dict[str, torch.Tensor], cfg: SOLOConfig) -> dict[str, torch.Tensor]:
    """SOLO's tensors from (part of) an `llm` state dict of the same text vocabulary: vocabulary rows extended by
    their mean, and the patch projection (zeros) alongside the embedding. Meta tensors map to meta tensors."""
    out = dict(state_dict)
    added = cfg.model_vocab_size - cfg.vocab_size
    for name in VOCABULARY_ROWS:
        if name in state_dict:
            rows = state_dict[name]
            if rows.shape[0] != cfg.vocab_size:
                raise ValueError(f"{name} has {rows.shape[0]} rows, but the run's tokenizer has {cfg.vocab_size} "
                                 f"tokens (data.vocab_size): start from a language model of the same tokenizer")
            out[name] = torch.cat([rows, rows.mean(0, keepdim=True).expand(added, -1)])
    if "tok_embeddings.weight" in state_dict:
        embedding = state_dict["tok_embeddings.weight"]
        out["patch_embeddings.weight"] = torch.zeros(cfg.dim, PATCH_VALUES, dtype=embedding.dtype,
                                                     device=embedding.device)
    if cfg.tie_embeddings and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


class LlamaStartAdapter:
    """models.spec.StateDictAdapter "hf" of SOLO: a Hugging Face LlamaForCausalLM (model_type llama) or
    MistralForCausalLM (model_type mistral: Llama's tensors and names) imports as a SOLO start
    (from_language_model). A Mistral with a `sliding_window` is refused: attention here is full causal, which
    is Mistral's only up to that many tokens. SOLO itself has no Hugging Face form."""

    llama = LlamaAdapter()
    exports = False

    def to_native(self, state_dict: dict[str, torch.Tensor], model_cfg: SOLOConfig) -> dict[str, torch.Tensor]:
        return from_language_model(self.llama.to_native(state_dict, model_cfg), model_cfg)

    def from_native(self, state_dict: dict[str, torch.Tensor], model_cfg: SOLOConfig) -> dict[str, torch.Tensor]:
        raise ValueError(NO_EXPORT)

    def config_problems(self, config: dict, model_cfg: SOLOConfig) -> list[str]:
        if config.get("model_type") == "mistral":
            if config.get("sliding_window") is not None:
                return [f"config.json is a Mistral with sliding_window={config['sliding_window']}, but attention here "
                        "is full causal: set sliding_window to null in config.json to start from it with full "
                        "attention (the same model for sequences up to that window)"]
            config = dict(config, model_type="llama")  # otherwise a Llama: same tensors, names and fields
        return self.llama.config_problems(config, model_cfg)

    def export_config(self, model_cfg: SOLOConfig, max_position_embeddings: int) -> dict:
        raise ValueError(NO_EXPORT)
