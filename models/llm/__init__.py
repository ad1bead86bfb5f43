from models.common.text import TEXT_DATA, TOKEN_LOSS
from models.llm.hf import LlamaAdapter
from models.llm.model import LLMConfig, Transformer, flops_per_attention_pair, flops_per_token
from models.llm.parallelize import PLAN, check_layout, n_layers, split_stage
from models.spec import ModelSpec

model_spec = ModelSpec(
    name="llm",
    config_cls=LLMConfig,
    model_cls=Transformer,
    data=TEXT_DATA,
    loss=TOKEN_LOSS,
    plan=PLAN,
    flops_per_token=flops_per_token,
    flops_per_attention_pair=flops_per_attention_pair,
    check_layout=check_layout,
    n_layers=n_layers,
    split_stage=split_stage,
    state_dict_adapters={"hf": LlamaAdapter()},
)
