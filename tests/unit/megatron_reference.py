"""Megatron-Core's side of tests/unit/test_megatron.py: its GPTModel (local layer spec) on CPU, its forward and its
dist_checkpointing, run in spawned gloo processes. Imports only torch and megatron-core (each spawned process imports
this module), so the processes start fast.

Megatron's forward on CPU needs three stand-ins, here only: torch.cuda.current_device (RoPE moves its frequencies
there; its checkpoint saving broadcasts a flag from there), the tensor-parallel RNG tracker's fork (around attention
dropout, which is 0 here) and torch.cuda.synchronize (its checkpoint writer); `convert to-megatron` patches the two
torch.cuda ones around its save."""
import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import random
from megatron.core.transformer.transformer_config import TransformerConfig

from tests.conftest import TEST_VOCAB

SEQ = 32
# Megatron's model of the same architecture as tests/unit/test_hf.py's SMALL (ffn: swiglu_hidden_dim(64, 64) = 192).
GPT = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=192)


def tokens() -> torch.Tensor:
    return torch.randint(0, TEST_VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def megatron_on_cpu() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *_: None
    random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()


def gpt_model(config: dict, tp: int, pp: int):
    """Megatron's GPTModel (local spec) of `config`: GPT above, or a gpt_config.json written by the export."""
    model_args = {key: config.pop(key) for key in ("vocab_size", "max_sequence_length", "position_embedding_type",
                                                    "rotary_base", "rotary_percent",
                                                    "share_embeddings_and_output_weights") if key in config}
    config.pop("activation_func", None)
    transformer = TransformerConfig(
        **{"gated_linear_unit": True, "normalization": "RMSNorm", "add_bias_linear": False, **config},
        activation_func=F.silu, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False)
    return GPTModel(transformer, get_gpt_layer_local_spec(normalization="RMSNorm"),
                    **{"vocab_size": TEST_VOCAB, "max_sequence_length": SEQ, "position_embedding_type": "rope",
                       **model_args},
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage()).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    """Megatron's forward: [batch, seq, this tp rank's vocabulary shard]."""
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1)  # its default mask is built on CUDA
    return model(tokens(), torch.arange(SEQ).expand(2, SEQ), attention_mask=mask)


def megatron_world(rank: int, port: int, work: Path, export: Path) -> None:
    """Everything Megatron does, in a gloo world of 2: save at tp=2 (and its logits), reshard that to pp=2, load
    the export strictly at tp=2 (its logits) and at pp=2."""
    megatron_on_cpu()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(0)
    model = gpt_model(dict(GPT), tp=2, pp=1)
    torch.save(logits(model), work / f"megatron-logits-{rank}.pt")
    dist_checkpointing.save(model.sharded_state_dict(), str(work / "tp2"))
    exported = gpt_model(json.loads((export / "gpt_config.json").read_text()), tp=2, pp=1)
    dist_checkpointing.load(exported.sharded_state_dict(), str(export), strict="raise_all")
    torch.save(logits(exported), work / f"export-logits-{rank}.pt")

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    resharded = gpt_model(dict(GPT), tp=1, pp=2)
    dist_checkpointing.load(resharded.sharded_state_dict(), str(work / "tp2"), strict="raise_all")
    dist_checkpointing.save(resharded.sharded_state_dict(), str(work / "pp2"))
    exported = gpt_model(json.loads((export / "gpt_config.json").read_text()), tp=1, pp=2)
    dist_checkpointing.load(exported.sharded_state_dict(), str(export), strict="raise_all")
    dist.destroy_process_group()
