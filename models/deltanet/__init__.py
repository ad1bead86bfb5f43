"""DeltaNet: linear attention with the delta rule (models/deltanet/model.py), its ops (ops/),
and how to shard it (parallelize.py: TP by heads, CP by state passing, the LLM's pipeline split)."""
from models.deltanet.model import DeltaNet, DeltaNetConfig, flops_per_token
from models.deltanet.parallelize import check_layout, parallelize_deltanet, split_stage
from models.spec import ModelSpec

model_spec = ModelSpec(
    name="deltanet",
    config_cls=DeltaNetConfig,
    model_cls=DeltaNet,
    parallelize=parallelize_deltanet,
    flops_per_token=flops_per_token,
    check_layout=check_layout,
    split_stage=split_stage,
)
