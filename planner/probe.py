"""Activation memory of a model's pieces, measured on the meta device: the family's own model (built from its
ModelSpec, cut with its pipeline split, its blocks wrapped by the trainer's activation checkpointing) runs one
micro-batch forward, loss and backward on tensors that have shapes but no data, and LiveBytes counts what is
alive. Nothing family-specific is assumed: what a layer keeps for backward is whatever its code keeps.

A model is measured as pieces (the first stage's embedding, each distinct layer, the last stage's head and
loss) so that any pipeline stage's memory is a sum of them without running it.

Routing (a mixture of experts) reads how many tokens go where: bincount has no meta kernel and its counts
cannot be read from a meta tensor. The probe gives every bin an equal share, the balanced load a trained router
aims for, and hands those counts to code that reads them.

Softmax attention on the meta device would take torch's math path, which keeps the T x T attention weights;
training runs a flash kernel (CPU: torch's flash kernel, GPU: flash-attn), which keeps the output and its
log-sum-exp. The probe runs torch's CPU flash kernel's meta implementation in its place.
"""
import copy
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from models.spec import ModelSpec
from parallel.activation_checkpoint import checkpoint_block
from planner.live_bytes import LiveBytes


class ProbeError(ValueError):
    """The model's forward cannot run on the meta device (it reads values the probe cannot invent)."""


class _MetaProbe(LiveBytes):
    """LiveBytes on meta tensors, with balanced counts for bincount and reads of them."""

    def __init__(self):
        super().__init__()
        self.counts: dict[int, torch.Tensor] = {}  # storage of a meta bincount -> the balanced counts it stands for
        self.forward = True  # the traffic below is counted in the forward (recomputation repeats it)
        self.routed = 0  # elements bincount counted: (token, expert) assignments, the rows all-to-all moves
        self.kv_elements = 0  # elements of the keys and values attention read: what a context-parallel ring passes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.bincount.default and args[0].is_meta:
            values, bins = args[0], max(kwargs.get("minlength", args[2] if len(args) > 2 else 0), 1)
            self.routed += values.numel() if self.forward else 0
            share = torch.full((bins,), values.numel() // bins, dtype=torch.long)
            share[: values.numel() % bins] += 1
            out = torch.empty(bins, dtype=torch.long, device="meta")
            self.counts[out.untyped_storage()._cdata] = share
            self.add(out)
            return out
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and source.is_meta and func in (torch.ops.aten._to_copy.default,
                                                               torch.ops.aten._local_scalar_dense.default) \
                and kwargs.get("device", torch.device("meta")).type != "meta":
            share = self.counts.get(source.untyped_storage()._cdata)
            if share is None or share.shape != source.shape:
                raise ProbeError(f"the model's forward reads the values of a meta tensor ({func}); its activation "
                                 f"memory cannot be sized on the meta device")
            return share.clone() if func is torch.ops.aten._to_copy.default else share.item()
        return super().__torch_dispatch__(func, types, args, kwargs)


@contextmanager
def _flash_attention_on_meta(probe: _MetaProbe):
    """scaled_dot_product_attention on meta tensors runs as a flash kernel (what that keeps for backward).
    Replaced on the module for the probe's duration, not by a TorchFunctionMode: activation checkpointing
    recomputes in backward, which on the meta device runs in another thread, where a mode is not active."""
    original = F.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not q.is_meta or attn_mask is not None:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                            enable_gqa=enable_gqa)
        probe.kv_elements += k.numel() + v.numel() if probe.forward else 0
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                         scale=scale)[0]

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass(frozen=True)
class PieceMemory:
    """Bytes of one micro-batch in one piece of the model."""
    retained: int  # held from the end of its forward (loss included) until its backward
    peak: int  # the most alive at once during its forward and backward (retained included)
    kv_elements: int = 0  # keys and values its attention reads (context parallelism passes them around the ring)
    routed: int = 0  # (token, expert) assignments of its routing (expert parallelism moves each one's hidden state)
    output: int = 0  # bytes of its output (the last piece: the model's, e.g. logits, before the loss)


@dataclass(frozen=True)
class Piece:
    """A part of the model a pipeline stage may hold: the first stage's extra (embedding), one layer, or the
    last stage's extra (final norm, head, loss)."""
    name: str
    params: int  # parameter elements
    expert_params: int  # of which in stacked expert weights (ndim >= 3: one slice per expert), split by ep
    memory: PieceMemory


@dataclass(frozen=True)
class ProbedModel:
    """A model's pieces for one micro-batch, in the order a pipeline runs them."""
    first: Piece  # the first stage's extra (embedding)
    layers: list[Piece]  # every layer, in order
    last: Piece  # the last stage's extra (final norm, head, loss)
    hidden_elements: int  # of the hidden state one micro-batch hands on (per cp rank, before tp)

    def rows(self, factor: int) -> "ProbedModel":
        """The same model for micro-batches of `factor` times the rows: every activation is per row."""
        def scale(piece: Piece) -> Piece:
            m = piece.memory
            return dataclasses.replace(piece, memory=PieceMemory(*(factor * getattr(m, f.name)
                                                                   for f in dataclasses.fields(m))))
        scaled = {id(p): scale(p) for p in {id(p): p for p in [self.first, *self.layers, self.last]}.values()}
        return ProbedModel(scaled[id(self.first)], [scaled[id(p)] for p in self.layers], scaled[id(self.last)],
                           factor * self.hidden_elements)


class ModelProbe:
    """The pieces of one model config for micro-batches of `rows` x `tokens` per rank (tokens: after the cp
    split), activations in `dtype`, under activation checkpointing `mode`."""

    def __init__(self, spec: ModelSpec, model_cfg, rows: int, tokens: int, dtype: torch.dtype, mode: str):
        self.spec, self.model_cfg, self.rows, self.tokens, self.dtype, self.mode = \
            spec, model_cfg, rows, tokens, dtype, mode
        with torch.device("meta"):
            self.base = spec.model_cls(model_cfg).to(dtype)

    def _part(self, layer_ids: list[int], is_first: bool, is_last: bool) -> nn.Module:
        part = copy.deepcopy(self.base)
        self.spec.split_stage(part, layer_ids, is_first, is_last)
        blocks = self.spec.plan.blocks(part)
        if self.mode != "none":
            for name, block in list(blocks.items()):
                blocks[name] = checkpoint_block(block, self.mode)
        return part.train()

    def _batch(self) -> dict[str, torch.Tensor]:
        tokens = torch.zeros(self.rows, self.tokens, dtype=torch.long, device="meta")
        batch = dict(self.spec.data.prompt_batch(tokens))
        for name, key in self.spec.data.keys.items():  # what the loss reads besides the inputs (targets)
            if key.consumer == "loss":
                batch[name] = torch.zeros_like(tokens)
        return batch

    @cached_property
    def _hidden(self) -> torch.Tensor:
        """What the first stage hands on (a pipeline's activation), as a meta tensor."""
        with torch.no_grad():
            inputs, kwargs = self._inputs(self._batch())
            return self._part([], True, False)(*inputs, **kwargs)

    def _inputs(self, batch) -> tuple[tuple, dict]:
        from launcher.trainer import model_inputs

        return model_inputs(self.spec.data.keys, batch)

    def measure(self, layer_ids: list[int], is_first: bool, is_last: bool) -> PieceMemory:
        part = self._part(layer_ids, is_first, is_last)
        for p in part.parameters():  # gradients are counted as model state, not here
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        batch = self._batch()
        inputs, kwargs = self._inputs(batch)
        if not is_first:
            inputs = (self._hidden.detach().requires_grad_(),)
        probe = _MetaProbe()
        for p in part.parameters():  # known before the forward, so that views of them count as nothing new
            probe.add(p)
        with probe, _flash_attention_on_meta(probe):
            start = probe.now
            out = part(*inputs, **kwargs)
            output = out.untyped_storage().nbytes()
            if is_last:
                out = self.spec.loss.compute(out, batch).loss_sum
            retained = probe.now - start
            probe.forward = False
            out.backward(torch.ones_like(out))
            del out
        return PieceMemory(retained, probe.peak - start, probe.kv_elements, probe.routed, output)

    @property
    def hidden_elements(self) -> int:
        """Elements of the hidden state one micro-batch hands from layer to layer (what TP's sequence-parallel
        collectives and pipeline sends move)."""
        return self._hidden.numel()

    def pieces(self) -> ProbedModel:
        """The model's pieces; layers of one shape are measured once."""
        measured: dict[tuple, Piece] = {}
        layers = []
        blocks = self.spec.plan.blocks(self.base)
        for i, (name, block) in enumerate(blocks.items()):
            shape = tuple((n, tuple(p.shape)) for n, p in block.named_parameters()) + \
                tuple(type(m).__name__ for m in block.modules())
            if shape not in measured:
                measured[shape] = self._piece(f"layer {name}", block, self.measure([i], False, False))
            layers.append(measured[shape])
        first = self._part([], True, False)
        last = self._part([], False, True)
        return ProbedModel(self._piece("embedding", first, self.measure([], True, False)), layers,
                           self._piece("head and loss", last, self.measure([], False, True)), self.hidden_elements)

    @staticmethod
    def _piece(name: str, module: nn.Module, memory: PieceMemory) -> Piece:
        params = [p for p in module.parameters()]
        total = sum(p.numel() for p in params)
        return Piece(name, total, sum(p.numel() for p in params if p.ndim >= 3), memory)
