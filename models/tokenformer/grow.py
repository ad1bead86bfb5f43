"""`shardwright convert grow SOURCE OUT`: a bigger TokenFormer from a trained one, by adding parameter tokens.

A Pattention of n tokens grows to n' > n: its key tokens [n, d_in] and value tokens [n, d_out] keep the
old rows as their first n and gain n' - n new ones (each Q/K/V, output-projection or FFN Pattention of
every layer, by kind). launcher/convert.py loads the checkpoint and writes the new run; this module
says how the config and the tensors change.

- `preserving` (default): new key tokens zero, new value tokens drawn by the init rule, and each grown
  kind's tau fixed at the old model's value. A new token's score is then 0, so it changes no norm
  and gets GELU(0) = 0: the grown model computes the old function exactly. The value rows must not be
  zero as well: a token with zero key and zero value never receives a gradient (the key's gradient
  is proportional to the value, the value's to GELU(0) = 0). softmax gives a zero score weight
  exp(0) = 1, so it cannot grow this way.
- `reference`: the reference implementation's growth (GPT-NeoX fork, custom_load_fn_incremental): new
  keys and values drawn by the init rule, tau = sqrt(n') (taus 0). It changes the function.

Optimizer (AdamW): `carry` keeps the moments of the old rows and the step counts, new rows start with zero
moments; `reset` starts every moment and step count at zero, exactly like a fresh AdamW (the
reference restarts its optimizer). The learning-rate schedule and the data position are kept.
"""
import argparse

import torch

from models.spec import CheckpointCommand, CheckpointContents
from models.tokenformer.model import TokenFormerConfig

KINDS = ("qkv", "proj", "ffn")
MODES = ("preserving", "reference")
OPTIMIZER_MODES = ("carry", "reset")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for kind, what in zip(KINDS, ("each Q, K and V Pattention", "the attention output Pattention", "the FFN")):
        parser.add_argument(f"--{kind}-tokens", type=int, metavar="N", help=f"parameter tokens of {what} after "
                            f"growing (default: as the checkpoint)")
    parser.add_argument("--mode", choices=MODES, default="preserving",
                        help="preserving (default): zero new keys and a fixed tau, the grown model computes the same "
                             "function; reference: the reference code's growth (new keys and values random, "
                             "tau = sqrt(new count)), which changes the function")
    parser.add_argument("--optimizer", choices=OPTIMIZER_MODES, default="carry",
                        help="carry (default): AdamW moments of the old rows and step counts kept, new rows zero; "
                             "reset: every moment and step count zero, as a fresh AdamW")


def model_changes(args: argparse.Namespace, cfg: TokenFormerConfig) -> dict:
    """The grown config's token counts and taus; ValueError for a request that grows nothing or shrinks."""
    asked = {kind: getattr(args, f"{kind}_tokens") for kind in KINDS if getattr(args, f"{kind}_tokens") is not None}
    counts = " / ".join(f"{kind} {getattr(cfg, f'{kind}_tokens')}" for kind in KINDS)
    if bad := [f"--{kind}-tokens {n}" for kind, n in asked.items() if n < 1]:
        raise ValueError(f"{', '.join(bad)}: token counts must be positive integers")
    if fewer := [f"--{kind}-tokens {n}" for kind, n in asked.items() if n < getattr(cfg, f"{kind}_tokens")]:
        raise ValueError(f"{', '.join(fewer)} would shrink the checkpoint's tokens ({counts}); growing only adds "
                         f"tokens")
    grown = {kind: n for kind, n in asked.items() if n > getattr(cfg, f"{kind}_tokens")}
    if not grown:
        raise ValueError(f"nothing to grow: the checkpoint has {counts} tokens; ask for more with "
                         f"--qkv-tokens, --proj-tokens or --ffn-tokens")
    if args.mode == "preserving" and cfg.normalization == "softmax":
        raise ValueError("--mode preserving is impossible with normalization softmax (a zero key still gets weight "
                         "exp(0) = 1); use --mode reference, which changes the function")
    # preserving: the old scale, since sqrt of the new count would rescale every score (and the output).
    taus = {f"{kind}_tau": cfg.tau(kind) if args.mode == "preserving" else 0.0 for kind in grown}
    return {**{f"{kind}_tokens": n for kind, n in grown.items()}, **taus}


@torch.no_grad()
def grow(args: argparse.Namespace, source: CheckpointContents, target: CheckpointContents, log) -> None:
    """Fill the grown run (freshly initialized: new tokens drawn by the init rule) from the source: every
    tensor's old rows are the first rows of the new one, the token axis being the only one that grows."""
    old_cfg, new_cfg = source.model_config, target.model_config
    for kind in KINDS:
        n_old, n_new = getattr(old_cfg, f"{kind}_tokens"), getattr(new_cfg, f"{kind}_tokens")
        log(f"{kind} tokens: {n_old} -> {n_new}" if n_new > n_old else f"{kind} tokens: {n_old} (unchanged)")
    if args.mode == "preserving":
        log("mode preserving: new key tokens zero, new value tokens from the init rule, tau fixed at the old "
            "model's: the grown model computes the same function")
    else:
        log("mode reference: new keys and values from the init rule, tau = sqrt(new count): the grown model does "
            "NOT compute the same function (the reference code's growth)")
    for name, new in target.model.items():
        old = source.model[name]
        new[:len(old)] = old
        if args.mode == "preserving" and name.endswith("key_param_tokens"):
            new[len(old):] = 0  # the new values keep their draw: zero ones too would never get a gradient
    for key, new in target.optimizer.items():
        old = source.optimizer[key]
        if not isinstance(old, torch.Tensor):  # param-group options: lr (where the schedule is), betas, ...
            target.optimizer[key] = old
        elif args.optimizer == "reset":
            new.zero_()
        elif old.ndim == 0:  # a step count
            new.copy_(old)
        else:  # a moment: the new rows stay zero
            new.zero_()
            new[:len(old)] = old
    log("optimizer: " + ("AdamW moments of the old rows and step counts carried, new rows zero"
                         if args.optimizer == "carry" else "reset (zero moments and step counts, as a fresh AdamW)"))


GROW = CheckpointCommand(
    help="grow a TokenFormer by adding parameter tokens, function-preserving by default",
    add_arguments=add_arguments, model_changes=model_changes, convert=grow,
    preserves_function=lambda args: args.mode == "preserving")
