from models.llm.model import LLMConfig, Transformer, flops_per_token
from models.llm.parallelize import check_layout, parallelize_llm, split_stage
from models.spec import ModelSpec

model_spec = ModelSpec(
    name="llm",
    config_cls=LLMConfig,
    model_cls=Transformer,
    parallelize=parallelize_llm,
    flops_per_token=flops_per_token,
    check_layout=check_layout,
    split_stage=split_stage,
)
