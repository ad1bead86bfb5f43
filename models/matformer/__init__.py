"""MatFormer: nested FFNs trained jointly or by sampling (model.py, training.py), sharded round-robin over
tensor parallelism (parallelize.py), submodels extracted as dense `llm` checkpoints."""
from dataclasses import replace

from models.llm.model import flops_per_attention_pair
from models.llm.parallelize import n_layers, split_stage
from models.matformer.extract import EXTRACT
from models.matformer.model import MatFormer, MatFormerConfig, flops_per_token
from models.matformer.parallelize import PLAN, check_layout
from models.matformer.training import configure, submodel_data, submodel_loss
from models.spec import ModelSpec

_spec = ModelSpec(
    name="matformer",
    config_cls=MatFormerConfig,
    model_cls=MatFormer,
    # The default config's data and loss; a run trains with configured_spec(family, its config).
    data=submodel_data(MatFormerConfig()),
    loss=submodel_loss(MatFormerConfig()),
    plan=PLAN,
    flops_per_token=flops_per_token,
    flops_per_attention_pair=flops_per_attention_pair,  # the LLM's attention
    check_layout=check_layout,
    n_layers=n_layers,
    split_stage=split_stage,
    checkpoint_commands={"extract": EXTRACT},
)
model_spec = replace(_spec, configure=configure(_spec))
