"""SOLO: one transformer for images and text (model.py), its packed image-caption data and end-of-run caption
accuracy (data.py), sharded as the LLM plus its patch projection (parallelize.py)."""
from models.common.text import TOKEN_LOSS
from models.llm.model import flops_per_attention_pair
from models.solo.data import SOLO_DATA
from models.solo.model import SOLO, SOLOConfig, flops_per_token
from models.solo.start import LlamaStartAdapter, from_language_model
from models.solo.parallelize import PLAN, check_layout, n_layers, split_stage
from models.spec import ModelSpec

model_spec = ModelSpec(
    name="solo",
    config_cls=SOLOConfig,
    model_cls=SOLO,
    data=SOLO_DATA,
    loss=TOKEN_LOSS,  # targets are the captions' tokens only (models/solo/data.py)
    plan=PLAN,
    flops_per_token=flops_per_token,
    flops_per_attention_pair=flops_per_attention_pair,  # the LLM's attention
    check_layout=check_layout,
    n_layers=n_layers,
    split_stage=split_stage,
    # Starts from a language model: an `llm` run's checkpoint, or a Hugging Face Llama (models/solo/start.py).
    starts_from={"llm": from_language_model},
    state_dict_adapters={"hf": LlamaStartAdapter()},
)
