from models.llm.parallelize import split_stage
from models.moe.model import MoEConfig, MoETransformer, flops_per_token
from models.moe.parallelize import check_layout, parallelize_moe
from models.spec import ModelSpec

model_spec = ModelSpec(
    name="moe",
    config_cls=MoEConfig,
    model_cls=MoETransformer,
    parallelize=parallelize_moe,
    flops_per_token=flops_per_token,
    check_layout=check_layout,
    split_stage=split_stage,
)
