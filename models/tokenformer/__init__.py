"""TokenFormer: projections as attention over parameter tokens (model.py), tensor parallelism over
those tokens (parallelize.py), and growth by adding tokens (grow.py: `shardwright convert grow`)."""
from models.common.text import TEXT_DATA, TOKEN_LOSS
from models.llm.model import flops_per_attention_pair
from models.llm.parallelize import n_layers, split_stage
from models.spec import ModelSpec
from models.tokenformer.grow import GROW
from models.tokenformer.model import TokenFormer, TokenFormerConfig, flops_per_token
from models.tokenformer.parallelize import PLAN, check_layout

model_spec = ModelSpec(
    name="tokenformer",
    config_cls=TokenFormerConfig,
    model_cls=TokenFormer,
    data=TEXT_DATA,
    loss=TOKEN_LOSS,
    plan=PLAN,
    flops_per_token=flops_per_token,
    flops_per_attention_pair=flops_per_attention_pair,  # the LLM's attention
    check_layout=check_layout,
    n_layers=n_layers,
    split_stage=split_stage,
    checkpoint_commands={"grow": GROW},
)
