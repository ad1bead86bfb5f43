"""The prediction for one config: its layout checked by the trainer's own validation, its model probed on the
meta device, its memory per rank (planner/memory.py)."""
import json
from functools import lru_cache

import torch

from launcher.config import Config, validate
from models import get_model_spec
from planner.memory import Layout, RankMemory, peak_rank_memory
from planner.probe import ModelProbe, ProbedModel


def layout_of(cfg: Config, world_size: int) -> tuple[Layout, int]:
    """The layout of a config (validated as `train` validates it) and its micro-batches per step."""
    dims = validate(cfg, world_size)
    t, p = cfg.train, cfg.parallel
    layout = Layout(dims, t.micro_batch_size, t.activation_checkpoint, p.pp_schedule, p.pp_stages_per_rank,
                    p.pp_layout)
    return layout, t.global_batch_size // (t.micro_batch_size * dims.dp)


@lru_cache(maxsize=64)
def _one_row(family: str, model_args: str, vocab_size: int, tokens: int, dtype: torch.dtype, mode: str) -> ProbedModel:
    spec = get_model_spec(family)
    model_cfg = spec.config_cls(**{**json.loads(model_args), "vocab_size": vocab_size})
    return ModelProbe(spec, model_cfg, 1, tokens, dtype, mode).pieces()


def pieces_for(cfg: Config, layout: Layout, dtype: torch.dtype) -> ProbedModel:
    """The probed pieces of cfg's model for one micro-batch of `layout`: probed for one row (cached: layouts
    share it), scaled to the micro-batch's rows."""
    model_cfg = cfg.model_config()
    one_row = _one_row(cfg.model.family, json.dumps(cfg.model.args, sort_keys=True), model_cfg.vocab_size,
                       cfg.train.seq_len // layout.dims.cp, dtype, layout.activation_checkpoint)
    return one_row.rows(layout.micro_batch_size)


def predict_memory(cfg: Config, world_size: int, dtype: torch.dtype = torch.float32) -> RankMemory:
    """Peak bytes of live tensors on the most loaded rank of cfg's run on `world_size` ranks."""
    layout, n_micro = layout_of(cfg, world_size)
    return peak_rank_memory(pieces_for(cfg, layout, dtype), layout, n_micro, dtype.itemsize)
