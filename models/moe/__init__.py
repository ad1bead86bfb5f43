from models.common.text import TEXT_DATA, TOKEN_LOSS
from models.llm.model import flops_per_attention_pair
from models.llm.parallelize import n_layers, split_stage
from models.moe.hf import MoEAdapter
from models.moe.model import MoEConfig, MoETransformer, flops_per_token
from models.moe.parallelize import PLAN, check_layout
from models.spec import ModelSpec, StepContext, TrainingHooks


def weigh_aux_losses(model: MoETransformer, context: StepContext) -> None:
    # A layer's aux + z share is this rank's part of the loss of its forward's batch over dp x cp:
    # x dp*cp undoes the gradient averaging over those ranks, / micro-batches makes the step's aux
    # loss the mean over its forwards.
    model.set_aux_loss_scale(context.gradient_average / context.micro_batches)


model_spec = ModelSpec(
    name="moe",
    config_cls=MoEConfig,
    model_cls=MoETransformer,
    data=TEXT_DATA,
    loss=TOKEN_LOSS,
    plan=PLAN,
    flops_per_token=flops_per_token,
    flops_per_attention_pair=flops_per_attention_pair,  # the LLM's attention
    check_layout=check_layout,
    n_layers=n_layers,
    split_stage=split_stage,
    hooks=TrainingHooks(setup=weigh_aux_losses, after_optimizer_step=MoETransformer.end_step,
                        discard_records=MoETransformer.reset_stats),
    state_dict_adapters={"hf": MoEAdapter()},
)
