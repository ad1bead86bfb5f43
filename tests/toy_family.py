"""A model family that exists only in the tests, built from the family contract alone
(models/spec.py): the LLM decoder with a per-row model input and a loss of its own. It trains
through the real trainer under every layout without launcher/ or parallel/ knowing it.

- `row_shift` [rows]: a per-row input of the first pipeline stage, not cut by context parallelism:
  each row's token ids are rotated by it before the embedding.
- `row_weight` [rows]: read only by the loss, which weighs each row's token losses by it; the
  unweighted token loss is reported as the metric `token_loss`.
"""
import torch

from data.loader import LoaderWrapper
from models.common.loss import cross_entropy_per_row
from models.common.text import TEXT_DATA, TEXT_KEYS, count_targets
from models.llm import model_spec as llm
from models.llm.model import Transformer
from models.spec import BatchKey, DataSpec, LossSpec, LossTerms, ModelSpec, TrainingHooks


class RowShiftedDecoder(Transformer):
    def forward(self, tokens, row_shift=None, positions=None):
        if self.tok_embeddings is not None:  # the first pipeline stage; later ones get hidden states
            tokens = (tokens + row_shift[:, None]) % self.cfg.vocab_size
        return super().forward(tokens, positions)


class RowKeyedLoader(LoaderWrapper):
    """The text loader's micro-batches plus the two per-row keys, made from each row's tokens (so
    every layout sees the same)."""

    def micro_batches(self, step: int) -> list[dict]:
        return [{**batch, "row_shift": batch["tokens"][:, 0] % 5, "row_weight": 1.0 + batch["tokens"][:, 1] % 2}
                for batch in self.loader.micro_batches(step)]


def build_loaders(*args, **kwargs):
    data, train, valid = TEXT_DATA.build_loaders(*args, **kwargs)
    return data, RowKeyedLoader(train), RowKeyedLoader(valid)


def weighted_cross_entropy(logits, batch) -> LossTerms:
    per_row = cross_entropy_per_row(logits, batch["targets"])
    return LossTerms((per_row * batch["row_weight"]).sum(), {"token_loss": per_row.sum()})


def count_backward_calls(model) -> dict[str, float]:
    return {"after_backward_calls": 1.0}


model_spec = ModelSpec(
    name="toy", config_cls=llm.config_cls, model_cls=RowShiftedDecoder,
    data=DataSpec(keys={**TEXT_KEYS, "row_shift": BatchKey(sequence_dim=None, consumer="inputs"),
                        "row_weight": BatchKey(sequence_dim=None, consumer="loss")},
                  build_loaders=build_loaders, prompt_batch=None),
    loss=LossSpec(compute=weighted_cross_entropy, count=count_targets, metrics=("token_loss",)),
    plan=llm.plan, flops_per_token=llm.flops_per_token, check_layout=llm.check_layout, n_layers=llm.n_layers,
    split_stage=llm.split_stage, hooks=TrainingHooks(after_backward=count_backward_calls))
