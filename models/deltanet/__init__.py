"""DeltaNet: linear attention with the delta rule (models/deltanet/model.py), its ops (ops/),
and how to shard it (parallelize.py: TP by heads, CP by state passing, the LLM's pipeline split)."""
from models.common.text import TEXT_DATA, TOKEN_LOSS
from models.deltanet.hf import DeltaNetAdapter
from models.deltanet.model import DeltaNet, DeltaNetConfig, flops_per_attention_pair, flops_per_token
from models.deltanet.parallelize import PLAN, check_layout, check_run
from models.llm.parallelize import n_layers, split_stage
from models.spec import ModelSpec

model_spec = ModelSpec(
    name="deltanet",
    config_cls=DeltaNetConfig,
    model_cls=DeltaNet,
    data=TEXT_DATA,
    loss=TOKEN_LOSS,
    plan=PLAN,
    flops_per_token=flops_per_token,
    flops_per_attention_pair=flops_per_attention_pair,
    check_layout=check_layout,
    check_run=check_run,
    n_layers=n_layers,
    split_stage=split_stage,
    state_dict_adapters={"hf": DeltaNetAdapter()},
)
