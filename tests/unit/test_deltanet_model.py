"""The DeltaNet model on one process: causality (convs included), packed documents (each document as if
alone), the hybrid layout, init, the linear-attention baseline (mixer_rule), and the refusal of the
zigzag cp layout (FLOPs: test_flops.py)."""
import pytest
import torch

from models import FAMILIES, get_model_spec
from models.deltanet.model import DeltaNet, DeltaNetConfig, DeltaNetLayer, ShortConvolution, l2_normalize
from models.deltanet.ops import linear_attention_recurrent
import models.deltanet.ops as ops
from models.deltanet.parallelize import check_layout, check_run, contiguous_problem
from models.llm.model import Attention
from parallel.options import ParallelizeOptions
from parallel.init import init_parameters
from models.spec import RunContext
from parallel.mesh import ParallelDims


def _model(**kw):
    cfg = DeltaNetConfig(dim=32, n_layers=3, n_heads=2, vocab_size=50, multiple_of=16, chunk_size=4, **kw)
    model = DeltaNet(cfg)
    init_parameters(model, 0)
    return model


def test_registered():
    assert "deltanet" in FAMILIES and get_model_spec("deltanet").model_cls is DeltaNet


def test_causal_and_hybrid():
    model = _model(use_gate=True, allow_neg_eigval=True, n_kv_heads=1, attention_layers=[1])
    assert isinstance(model.layers["1"].attention, Attention)
    assert isinstance(model.layers["0"].attention, DeltaNetLayer)
    tokens = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 50
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :9], b[:, :9]) and not torch.allclose(a[:, 9:], b[:, 9:])


def test_short_conv_is_causal_depthwise():
    conv = ShortConvolution(3, 4)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(1, 8, 3)
    y = conv(x)
    ref = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (3, 0)), conv.weight.unsqueeze(1),
                                     groups=3).transpose(1, 2)
    torch.testing.assert_close(y, torch.nn.functional.silu(ref))


def test_mixer_gets_bf16_inputs_under_bf16_autocast():
    """Under autocast the fp32 conv weights must not promote q, k, v to fp32: the delta rule's "auto" picks fla
    on CUDA only for fp16/bf16 inputs. l2_normalize computes in fp32 (as CUDA autocast computes its pow, sum
    and rsqrt) and returns x's dtype. An fp32 model without autocast stays fp32."""
    model = _model()
    seen = []
    model.layers["0"].attention.core_mixer.register_forward_hook(lambda _m, args, _out: seen.append(args))
    tokens = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        model(tokens)
    assert [x.dtype for x in seen[-1]] == [torch.bfloat16] * 4
    with torch.no_grad():
        model(tokens)
    assert [x.dtype for x in seen[-1]] == [torch.float32] * 4
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    assert torch.equal(l2_normalize(x), l2_normalize(x.float()).bfloat16())


def test_linear_rule_is_the_layer_without_beta():
    """mixer_rule=linear: no b_proj, and the mixer is plain linear attention on the layer's q, k, v."""
    model = _model(mixer_rule="linear")
    layer = model.layers["0"].attention
    assert layer.b_proj is None and not any("b_proj" in name for name, _ in model.named_parameters())
    seen = {}
    layer.core_mixer.register_forward_hook(lambda _m, args, out: seen.update(args=args, out=out))
    tokens = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(tokens)
    q, k, v, beta = seen["args"]
    assert beta is None
    torch.testing.assert_close(seen["out"], linear_attention_recurrent(q, k, v)[0])


def test_check_layout_mixer_rule_problems():
    dims = ParallelDims.resolve(world_size=1)

    def problems(**kw):
        return check_layout(DeltaNetConfig(dim=32, n_heads=2, vocab_size=50, **kw), dims, ParallelizeOptions())

    assert problems(mixer_rule="linear") == []
    assert any("mixer_rule='gated'" in p for p in problems(mixer_rule="gated"))
    assert any("allow_neg_eigval" in p for p in problems(mixer_rule="linear", allow_neg_eigval=True))
    assert any("backend='fla'" in p for p in problems(mixer_rule="linear", backend="fla"))


def test_check_run_refuses_fla_where_its_kernels_cannot_run(monkeypatch):
    """model.backend=fla against what a worker computes with (a CUDA device is only named here, never used): one
    line naming what to set instead, for each reason fla's kernels cannot run; nothing for other backends or where
    it runs."""
    cfg = DeltaNetConfig(dim=32, n_heads=2, vocab_size=50, backend="fla")
    cuda, bf16, fp32 = torch.device("cuda", 0), torch.bfloat16, torch.float32

    def problems(device, dtype, document_mask=False, config=cfg):
        return check_run(config, RunContext(document_mask, device, dtype))

    monkeypatch.setattr(ops, "_fla_chunk_delta_rule", lambda: None)  # fla not installed
    assert problems(None, None) == []  # a preflight: the node decides
    assert "takes no document ids" in problems(None, None, document_mask=True)[0]
    assert "run on CUDA only, not on cpu" in problems(torch.device("cpu"), fp32)[0]
    (missing,) = problems(cuda, bf16)
    assert "not importable here" in missing and "model.backend=chunked" in missing
    monkeypatch.setattr(ops, "_fla_chunk_delta_rule", lambda: object())  # fla installed
    assert problems(cuda, bf16) == []
    (fp32_problem,) = problems(cuda, fp32)
    assert "takes fp16/bf16 inputs, not torch.float32; set train.mixed_precision=bf16" in fp32_problem
    for backend in ("auto", "chunked"):
        assert problems(torch.device("cpu"), fp32, True, DeltaNetConfig(dim=32, n_heads=2, vocab_size=50,
                                                                         backend=backend)) == []


def test_zigzag_refused_for_state_passing():
    assert "cp_layout=contiguous" in contiguous_problem(ParallelizeOptions(cp_layout="zigzag"), 2)
    assert contiguous_problem(ParallelizeOptions(cp_layout="contiguous"), 2) is None
    assert contiguous_problem(ParallelizeOptions(cp_mode="ulysses"), 2) is None  # a ring of one: in order


# Two rows of 23 tokens: documents of 6, 1, 9, 7 and of 3, 4, 16 tokens (a one-token document; a
# boundary 1 token after another, inside the conv's reach; chunk 4 puts boundaries on and off chunk edges).
PACKED_LENGTHS = [(6, 1, 9, 7), (3, 4, 16)]


def _packed_row_ids() -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                        for lengths in PACKED_LENGTHS])


def test_short_conv_stays_inside_documents():
    """With document_ids each document is convolved as if alone (zeros before its first token)."""
    conv = ShortConvolution(3, 4).double()
    torch.nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 23, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = conv(x, _packed_row_ids())
    for row, lengths in enumerate(PACKED_LENGTHS):
        edges = torch.tensor((0, *lengths)).cumsum(0).tolist()
        for lo, hi in zip(edges, edges[1:]):
            torch.testing.assert_close(y[row:row + 1, lo:hi], conv(x[row:row + 1, lo:hi]), rtol=0, atol=1e-14)
    assert (y - conv(x)).abs().max() > 1e-2  # control: without the ids the taps cross the boundaries


@pytest.mark.parametrize("rule,attention_layers", [("delta", []), ("linear", []), ("delta", [1])],
                         ids=["delta", "linear", "hybrid"])
def test_each_document_equals_the_document_alone(rule, attention_layers):
    """A DeltaNet model (short convs, gate, negative eigenvalues; or linear attention; or the hybrid
    with softmax attention at layer 1) in fp64: the logits of every document of a packed row, with
    positions restarting at each document, equal that document run alone; the same rows without
    document_ids (mask off, positions still per document) differ after the first document."""
    model = _model(use_gate=True, allow_neg_eigval=rule == "delta", mixer_rule=rule,
                   attention_layers=attention_layers).double()
    tokens = torch.randint(0, 50, (2, 23), generator=torch.Generator().manual_seed(2))
    ids = _packed_row_ids()
    starts = torch.cat([torch.ones(2, 1, dtype=torch.bool), ids[:, 1:] != ids[:, :-1]], dim=1)
    first = torch.cummax(torch.where(starts, torch.arange(23), 0), dim=1).values  # each token's document start
    positions = torch.arange(23) - first
    with torch.no_grad():
        packed, unmasked = model(tokens, positions, document_ids=ids), model(tokens, positions)
        for row, lengths in enumerate(PACKED_LENGTHS):
            edges = torch.tensor((0, *lengths)).cumsum(0).tolist()
            for lo, hi in zip(edges, edges[1:]):
                alone = model(tokens[row:row + 1, lo:hi])
                assert (packed[row:row + 1, lo:hi] - alone).abs().max() <= 1e-12, (row, lo, hi)
                if lo > 0:  # mask-off control
                    assert (unmasked[row:row + 1, lo:hi] - alone).abs().max() > 1e-3, (row, lo, hi)


def test_document_ids_reach_the_mixer_of_every_layer():
    model = _model(attention_layers=[1])
    seen = []
    for block in model.layers.values():
        mixer = getattr(block.attention, "core_mixer", None) or block.attention.core_attention
        mixer.register_forward_hook(lambda _m, _a, kwargs, _o: seen.append(kwargs["document_ids"]), with_kwargs=True)
    ids = _packed_row_ids()
    with torch.no_grad():
        model(torch.zeros(2, 23, dtype=torch.long), document_ids=ids)
    assert len(seen) == 3 and all(s is ids for s in seen)
