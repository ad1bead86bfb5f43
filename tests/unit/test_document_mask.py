"""Packed documents: attention stays inside each document (models/common/attention.py, the block
kernels of parallel/context), the loader's document structure, and the FLOPs of what is attended.

References are independent of the code under test: a document run alone through the model, and
plain softmax with autograd over an explicit mask."""
import dataclasses
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from launcher.metrics import training_flops
from models.common.text import attention_pairs
from models.deltanet.model import DeltaNet, DeltaNetConfig
from models.llm.model import LLMConfig, Transformer, flops_per_attention_pair, flops_per_token
from parallel.context.kernels import CpuFlashKernel, MathKernel
from parallel.context.merge import merge_partials
from parallel.context.ring import _Block, _Documents, _visible_block_at, ring_attention
from parallel.init import init_parameters

aten = torch.ops.aten
VOCAB = 96
LLM = LLMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16, init_std=0.3)
LENGTHS = [[5, 9, 2], [16]]  # two rows of 16 tokens: three documents, one
SEQ = 16


def _document_ids(lengths: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths])


def _positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at every document (what the loader serves)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    index = torch.arange(document_ids.shape[1]).expand_as(document_ids)
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (len(LENGTHS), SEQ), generator=torch.Generator().manual_seed(seed))


def _per_document_difference(model: nn.Module, with_documents: bool) -> float:
    """Max abs difference between each document's logits in its packed row and the document run alone."""
    tokens, ids = _tokens(), _document_ids(LENGTHS)
    packed = model(tokens, _positions(ids), document_ids=ids) if with_documents else model(tokens)
    worst = 0.0
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for length in lengths:
            alone = model(tokens[row:row + 1, start:start + length])
            worst = max(worst, (packed[row, start:start + length] - alone[0]).abs().max().item())
            start += length
    return worst


def test_llm_packed_documents_equal_each_document_alone():
    model = Transformer(LLM).double()
    init_parameters(model, 0)
    assert _per_document_difference(model, with_documents=True) < 1e-12
    # Control: the same packed rows without document ids attend across documents.
    assert _per_document_difference(model, with_documents=False) > 1e-2


def test_hybrid_attention_layers_keep_to_their_document():
    """The DeltaNet hybrid's softmax layers: each document's output equals the layer on it alone (DeltaNet's
    own layers reset their state: tests/unit/test_deltanet_model.py)."""
    cfg = DeltaNetConfig(dim=32, n_layers=3, n_heads=2, vocab_size=50, multiple_of=16, chunk_size=4, init_std=0.3,
                         attention_layers=[1])
    model = DeltaNet(cfg).double()
    init_parameters(model, 0)
    attention = model.layers["1"].attention
    x = torch.randn(len(LENGTHS), SEQ, cfg.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ids = _document_ids(LENGTHS)
    for with_documents, check in ((True, lambda d: d < 1e-12), (False, lambda d: d > 1e-2)):
        packed = attention(x, _positions(ids), document_ids=ids) if with_documents else attention(x, None)
        worst, start = 0.0, 0
        for length in LENGTHS[0]:
            alone = attention(x[:1, start:start + length], None)
            worst = max(worst, (packed[0, start:start + length] - alone[0]).abs().max().item())
            start += length
        assert check(worst), (with_documents, worst)


def test_compiled_block_does_not_recompile_for_other_documents():
    """A block compiled as train.compile compiles it (parallel/parallelize.py) serves micro-batches of other numbers
    and lengths of documents without recompiling (dynamo's error_on_recompile raises otherwise), with eager's
    outputs: the loop over the documents runs outside the graph. Traced, it made dynamo guard on the number and the
    lengths of the segments and recompile for each new one (SOLO's packed samples hit the recompile limit within a
    few steps). The eager backend: recompiles are dynamo's guards, whatever the backend."""
    model = Transformer(LLM)
    init_parameters(model, 0)
    block = model.layers["0"]
    x = torch.randn(len(LENGTHS), SEQ, LLM.dim, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(block, backend="eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            for lengths in (LENGTHS, [[4, 4, 4, 4], [10, 6]], [[16], [1] * 16]):
                ids = _document_ids(lengths)
                torch.testing.assert_close(compiled(x, _positions(ids), document_ids=ids),
                                           block(x, _positions(ids), document_ids=ids), rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_decreasing_document_ids_are_refused():
    model = Transformer(LLM)
    with pytest.raises(ValueError, match="nondecreasing"):
        model(_tokens(), document_ids=_document_ids(LENGTHS).flip(1))


# ------------------------------------------------------------------------------------------ block kernels


def _reference(q, k, v, visible, scale):
    """Plain softmax attention over an explicit [B, Tq, Tk] visibility, with autograd: (out, lse)."""
    repeat = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(repeat, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows that see nothing: 0
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


# (q documents, k documents, causal): a diagonal block; an off-diagonal block where some query rows
# see no key (out 0, lse -inf); a block whose k side holds only a later document of row 1.
BLOCKS = [
    (_document_ids(LENGTHS), _document_ids(LENGTHS), True),
    (_document_ids([[5, 9, 2], [16]]), torch.tensor([[1] * 6 + [2] * 10, [0] * 16]), False),
    (torch.tensor([[0] * 8 + [1] * 8, [0] * 16]), torch.tensor([[1] * 16, [3] * 16]), False),
]


@pytest.mark.parametrize("kernel", [MathKernel(), CpuFlashKernel()], ids=["math", "cpu_flash"])
@pytest.mark.parametrize("block", range(len(BLOCKS)))
def test_block_kernels_with_documents_match_softmax(kernel, block):
    q_docs, k_docs, causal = BLOCKS[block]
    g = torch.Generator().manual_seed(block)
    q = torch.randn(2, SEQ, 4, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, SEQ, 2, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    dout = torch.randn(2, SEQ, 4, 8, dtype=torch.float64, generator=g)
    visible = q_docs.unsqueeze(2) == k_docs.unsqueeze(1)
    if causal:
        visible &= torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    ref_out, ref_lse = _reference(q, k, v, visible, 0.3)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    with torch.no_grad():
        out, lse = kernel.fwd(q, k, v, causal, 0.3, q_documents=q_docs, k_documents=k_docs)
        # The backward takes the final lse; rows that see nothing have no gradient, any finite lse does.
        grads = kernel.bwd(dout, q, k, v, out, ref_lse.nan_to_num(neginf=0.0), causal, 0.3, q_documents=q_docs,
                           k_documents=k_docs)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (lse - ref_lse).nan_to_num(0.0).abs().max() < 1e-12
    assert (out - ref_out).abs().max() < 1e-12
    for grad, ref in zip(grads, ref_grads):
        assert (grad - ref).abs().max() < 1e-12
    if block == 0:  # control: without documents the diagonal block attends across them
        plain, _ = kernel.fwd(q.detach(), k.detach(), v.detach(), True, 0.3)
        assert (plain - ref_out).abs().max() > 1e-2


def test_merge_of_rows_that_saw_nothing():
    out = torch.zeros(1, 3, 1, 2, dtype=torch.float64)
    lse = torch.tensor([[[float("-inf"), float("-inf"), 1.0]]], dtype=torch.float64)
    block_out = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]]]], dtype=torch.float64)
    block_lse = torch.tensor([[[0.5, float("-inf"), float("-inf")]]], dtype=torch.float64)
    merged_out, merged_lse = merge_partials(out, lse, block_out, block_lse)
    assert torch.equal(merged_out[0, :, 0], torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert merged_lse.tolist() == [[[0.5, float("-inf"), 1.0]]]


def test_ring_skips_blocks_without_a_shared_document():
    """Rank 1 of a zigzag ring of 2 against rank 0's block (its early chunk): skipped when no row shares a
    document, kept (with the block's ids for the kernel) when one does."""
    local = torch.tensor([[2, 2, 3, 3]])
    disjoint = _Documents(local, torch.tensor([[[0, 0, 1, 1]], [[2, 2, 3, 3]]]))
    assert _visible_block_at(1, 0, 4, True, True, disjoint) == (None, {})
    shared = _Documents(local, torch.tensor([[[0, 2, 9, 9]], [[2, 2, 3, 3]]]))
    block, documents = _visible_block_at(1, 0, 4, True, True, shared)
    assert block == _Block(slice(None), slice(0, 2), False)
    assert documents["k_documents"].tolist() == [[0, 2]]


def test_ring_of_one_with_documents_matches_core_attention():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, SEQ, 4, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, SEQ, 2, 8, generator=g, requires_grad=True) for _ in range(2))
    ids = _document_ids(LENGTHS)
    out, _ = ring_attention(q, k, v, None, document_ids=ids, kernel="cpu_flash")
    ref = Transformer(LLM).layers["0"].attention.core_attention(q, k, v, document_ids=ids)
    assert (out - ref).abs().max() < 1e-6
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)) < 1e-5


# ------------------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("cfg", [LLM, dataclasses.replace(LLM, n_kv_heads=4, n_layers=3)], ids=["gqa", "mha"])
def test_training_flops_count_only_the_attended_pairs(cfg):
    """FlopCounterMode on the math SDPA backend counts each document's attention as its full L x L square
    (bmm); the causal part of a document of L tokens is (L + 1) / (2 L) of it."""
    model = Transformer(cfg)
    ids = _document_ids(LENGTHS)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(_tokens(), _positions(ids), document_ids=ids).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert set(counts) <= {aten.mm, aten.bmm}, counts
    squares = sum(length * length for row in LENGTHS for length in row)
    causal = sum(Fraction(length * (length + 1), 2) for row in LENGTHS for length in row)
    measured = counts[aten.mm] + Fraction(counts[aten.bmm]) * causal / squares
    batch = {"tokens": _tokens(), "document_ids": ids}
    assert int(attention_pairs(batch)) == causal
    counted = training_flops(flops_per_token(cfg, SEQ), flops_per_attention_pair(cfg), SEQ, len(LENGTHS),
                             int(attention_pairs(batch)))
    assert counted == pytest.approx(float(measured), rel=1e-12)
    # Without documents the correction vanishes: whole-row causal pairs.
    assert int(attention_pairs({"tokens": _tokens()})) == len(LENGTHS) * SEQ * (SEQ + 1) // 2
