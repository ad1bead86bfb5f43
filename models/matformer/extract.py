"""`shardwright convert extract SOURCE OUT (--granularity F | --mix-n-match F1,...)`: a MatFormer submodel as a
dense `llm` run.

The submodel of granularity f (or of a Mix'n'Match vector: one fraction per layer) is the LLM whose layer l has
w_l = round(f_l x ffn_hidden_dim) FFN units: the first w_l rows of w1 and w3 and the first w_l columns of w2, every
other tensor as it is (parameter names are the LLM's). The new run's model config is the MatFormer's LLM fields with
ffn_hidden_dims = [w_0, ...] (uniform for a granularity, so that `convert to-hf` and `to-megatron` take it); the
MatFormer-only fields (granularities, mode, weights, mix_n_match) go. AdamW's moments are sliced as the weights, so
the run trains on where the MatFormer was (same step, schedule, data position; param_groups carried).
launcher/convert.py checks the new model against the MatFormer run at that submodel (source_inputs: ffn_widths).
"""
import argparse
import dataclasses

import torch

from models.llm.model import LLMConfig
from models.matformer.model import MatFormerConfig
from models.spec import CheckpointCommand, CheckpointContents


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Both parsed by `fractions` rather than argparse, so that every mistake ends with one line.
    parser.add_argument("--granularity", metavar="F", help="the submodel of one granularity (a fraction of the FFN "
                        "hidden size among the checkpoint's model.granularities) in every layer")
    parser.add_argument("--mix-n-match", metavar="F1,F2,...", help="a Mix'n'Match submodel: one granularity per layer, "
                        "comma-separated")


def fractions(args: argparse.Namespace, cfg: MatFormerConfig) -> list[float]:
    """The submodel's granularity of each layer; ValueError naming what is wrong with the options."""
    if (args.granularity is None) == (args.mix_n_match is None):
        raise ValueError("give exactly one of --granularity F and --mix-n-match F1,F2,...")
    option, text = ("--granularity", args.granularity) if args.granularity is not None \
        else ("--mix-n-match", args.mix_n_match)
    try:
        vector = [float(f) for f in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} {text}: not {'a number' if option == '--granularity' else 'numbers'}") from None
    if option == "--granularity":
        if len(vector) != 1:
            raise ValueError(f"--granularity {text}: one fraction; give one per layer with --mix-n-match")
        vector *= cfg.n_layers
    elif len(vector) != cfg.n_layers:
        raise ValueError(f"--mix-n-match {text} has {len(vector)} fractions; the checkpoint has {cfg.n_layers} layers "
                         f"(one each)")
    if unknown := sorted({f for f in vector if f not in cfg.granularities}):
        raise ValueError(f"{option} {text}: {', '.join(f'{f:g}' for f in unknown)} not among the checkpoint's "
                         f"granularities {', '.join(f'{f:g}' for f in cfg.granularities)}")
    return vector


def widths(args: argparse.Namespace, cfg: MatFormerConfig) -> list[int]:
    """The submodel's FFN hidden units per layer."""
    return [cfg.units(f) for f in fractions(args, cfg)]


def model_changes(args: argparse.Namespace, cfg: MatFormerConfig) -> dict:
    """The llm config of the submodel: the MatFormer's LLM fields, each layer's FFN size its width."""
    llm = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LLMConfig)}
    return {**llm, "ffn_hidden_dims": widths(args, cfg)}


def slice_prefix(old: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The leading `shape` block of `old`: a nested FFN weight's (or its moment's) submodel part; a tensor of the same
    shape whole."""
    return old[tuple(slice(0, n) for n in shape)]


@torch.no_grad()
def extract(args: argparse.Namespace, source: CheckpointContents, target: CheckpointContents, log) -> None:
    """Fill the llm run from the MatFormer's: every tensor (weight, AdamW moment) the prefix of its source, step
    counts and param-group options as saved."""
    log(f"submodel: FFN hidden units per layer {target.model_config.ffn_hidden_dims} of "
        f"{source.model_config.ffn_hidden_dim}")
    for name, new in target.model.items():
        new.copy_(slice_prefix(source.model[name], new.shape))
    for key, new in target.optimizer.items():
        old = source.optimizer[key]
        if isinstance(old, torch.Tensor):
            new.copy_(slice_prefix(old, new.shape))
        else:  # param-group options: lr (where the schedule is), betas, ...
            target.optimizer[key] = old


def submodel_inputs(args: argparse.Namespace, cfg: MatFormerConfig, rows: int) -> dict[str, torch.Tensor]:
    """The MatFormer's input that runs every row through the extracted submodel."""
    return {"ffn_widths": torch.tensor([widths(args, cfg)]).expand(rows, -1)}


EXTRACT = CheckpointCommand(
    help="a MatFormer submodel (a granularity or a Mix'n'Match vector) as a dense llm run",
    add_arguments=add_arguments, model_changes=model_changes, convert=extract,
    preserves_function=lambda args: True, target_family="llm", source_inputs=submodel_inputs)
