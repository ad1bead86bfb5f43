"""How a MatFormer trains: which submodel each micro-batch runs, and the loss over them.

The loaders are the text loaders, wrapped: every micro-batch gains `ffn_widths` [rows, n_layers] (the
submodel of each row, models/matformer/model.py), `submodel` [rows] (its index in
MatFormerConfig.submodels(), for the per-submodel losses) and two per-row weights for the loss.

- joint (training): the micro-batch's rows once per granularity (so a step's forward holds
  granularities x rows; lower train.micro_batch_size to keep the memory), loss sum_i weight_i L_i with
  L_i the granularity's mean token loss. Under pipeline parallelism the expanded micro-batches are the
  schedule's micro-batches, so every stage runs the same rows with the same widths.
- sampled (training): each micro-batch runs one granularity, drawn with probability ~ weight_i from
  (seed, step, micro-batch index) alone, the index counting micro-batches over the whole global batch
  (dp rank r's k-th is r x micro-batches per rank + k). So the same rows run the same granularity under
  any dp, tp, pp or cp layout with the same train.micro_batch_size (another micro-batch size groups the
  rows differently, hence other draws). Ranks cannot disagree, so nothing is checked at run time: the
  ranks of a tp, cp or pp group share their dp rank and loader, and every dp rank has the same number of
  micro-batches (launcher/config.py refuses a global batch that micro_batch_size x dp does not divide).
- evaluation: every granularity (weighted as in training) and every Mix'n'Match vector (weight 0);
  `eval_loss_<name>` is each submodel's mean token loss.
"""
import hashlib
from dataclasses import replace

import torch

from data.loader import LoaderWrapper
from models.common.loss import IGNORE_INDEX, cross_entropy_per_row
from models.common.text import TEXT_DATA, TEXT_KEYS, attention_pairs
from models.matformer.model import MatFormerConfig
from models.spec import BatchKey, DataSpec, LossSpec, LossTerms, ModelSpec

MATFORMER_KEYS = {
    **TEXT_KEYS,
    "ffn_widths": BatchKey(sequence_dim=None, consumer="every_stage"),
    "submodel": BatchKey(sequence_dim=None, consumer="loss"),
    # loss = sum over rows of loss_weight x the row's token losses; each row counts count_weight (0 or 1) x its
    # targets towards the normalization: a data row is counted once, by its first copy, so that the loss is
    # sum_i weight_i L_i (joint) whatever the layout. Integer counts and fp64 weights keep that exact.
    "loss_weight": BatchKey(sequence_dim=None, consumer="loss"),
    "count_weight": BatchKey(sequence_dim=None, consumer="loss"),
}


def sampled_granularity(seed: int, step: int, micro_batch: int, weights: list[float]) -> int:
    """The granularity that micro-batch `micro_batch` (its index in the global batch) of `step` runs in sampled
    mode: a function of its arguments only (no rank, no generator state), so every rank draws the same."""
    digest = hashlib.sha256(f"matformer:{seed}:{step}:{micro_batch}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    total, cumulative = sum(weights), 0.0
    for i, w in enumerate(weights):
        cumulative += w / total
        if u < cumulative:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)


def with_submodels(batch: dict[str, torch.Tensor], submodels: list[tuple[int, list[int], float, int]]) -> dict:
    """The batch's rows once per (index, widths, loss weight, count weight), in that order."""
    rows = next(iter(batch.values())).shape[0]
    out = {k: torch.cat([v] * len(submodels)) for k, v in batch.items()}
    out["ffn_widths"] = torch.tensor([widths for _, widths, _, _ in submodels]).repeat_interleave(rows, dim=0)
    for key, column, dtype in (("submodel", 0, torch.int64), ("loss_weight", 2, torch.float64),
                               ("count_weight", 3, torch.int64)):
        out[key] = torch.tensor([s[column] for s in submodels], dtype=dtype).repeat_interleave(rows)
    return out


class SubmodelLoader(LoaderWrapper):
    """A text loader whose micro-batches say which submodels run them (see the module's docstring)."""

    def __init__(self, loader, cfg: MatFormerConfig, seed: int, training: bool, first_micro_batch: int = 0):
        # first_micro_batch: the global index (see the module's docstring) of this rank's first micro-batch.
        super().__init__(loader)
        self.cfg, self.seed, self.training = cfg, seed, training
        self.first_micro_batch = first_micro_batch
        weights = cfg.loss_weights
        submodels = cfg.submodels()
        n = len(cfg.granularities)
        # Evaluation reports the training objective (joint: the weighted sum; sampled: its expectation).
        scale = 1.0 if cfg.mode == "joint" else 1.0 / sum(weights)
        self.trained = [(i, submodels[i][1], w * scale, int(i == 0)) for i, w in enumerate(weights)]
        self.evaluated = self.trained + [(n + j, widths, 0.0, 0) for j, (_, widths) in enumerate(submodels[n:])]

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        batches = self.loader.micro_batches(step)
        if not self.training:
            return [with_submodels(b, self.evaluated) for b in batches]
        if self.cfg.mode == "joint":
            return [with_submodels(b, self.trained) for b in batches]
        weights = self.cfg.loss_weights
        chosen = [self.trained[sampled_granularity(self.seed, step, self.first_micro_batch + k, weights)]
                  for k in range(len(batches))]
        return [with_submodels(b, [(i, widths, 1.0, 1)]) for b, (i, widths, _, _) in zip(batches, chosen)]


def submodel_data(cfg: MatFormerConfig) -> DataSpec:
    def build_loaders(data_cfg, seq_len, global_batch_size, micro_batch_size, dp_rank, dp_size, seed, log=print):
        data, train, valid = TEXT_DATA.build_loaders(data_cfg, seq_len, global_batch_size, micro_batch_size,
                                                     dp_rank, dp_size, seed, log=log)
        first = dp_rank * (global_batch_size // (micro_batch_size * dp_size))
        return (data, SubmodelLoader(train, cfg, seed, training=True, first_micro_batch=first),
                SubmodelLoader(valid, cfg, seed, training=False))

    return replace(TEXT_DATA, keys=MATFORMER_KEYS, build_loaders=build_loaders, attention_pairs=attention_pairs)


def submodel_loss(cfg: MatFormerConfig) -> LossSpec:
    names = [name for name, _ in cfg.submodels()]

    def compute(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossTerms:
        row_losses = cross_entropy_per_row(logits, batch["targets"])
        submodel = batch["submodel"]
        metrics = {f"loss_{name}": (row_losses * (submodel == i)).sum() for i, name in enumerate(names)}
        return LossTerms((row_losses * batch["loss_weight"].to(row_losses.dtype)).sum(), metrics)

    def count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((batch["targets"] != IGNORE_INDEX).sum(-1) * batch["count_weight"]).sum()

    # Training reports each granularity's mean loss when every step runs them all (joint); a sampled step runs
    # some, and Mix'n'Match vectors are never trained: evaluation reports those.
    per_submodel = tuple(f"loss_{name}" for name in names)
    trained = len(cfg.granularities) if cfg.mode == "joint" else 0
    return LossSpec(compute=compute, count=count, metrics=per_submodel[:trained], eval_metrics=per_submodel[trained:])


def configure(spec: ModelSpec):
    def for_config(cfg: MatFormerConfig) -> ModelSpec:
        return replace(spec, data=submodel_data(cfg), loss=submodel_loss(cfg), configure=None)
    return for_config
