"""The DeltaNet model on one process: causality (convs included), the hybrid layout, init, the
linear-attention baseline (mixer_rule), and the refusal of the zigzag cp layout (FLOPs: test_flops.py)."""
import pytest
import torch

from models import FAMILIES, get_model_spec
from models.deltanet.model import DeltaNet, DeltaNetConfig, DeltaNetLayer, ShortConvolution
from models.deltanet.ops import linear_attention_recurrent
from models.deltanet.parallelize import check_layout, contiguous_problem
from models.llm.model import Attention
from parallel.options import ParallelizeOptions
from parallel.init import init_parameters
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


def test_zigzag_refused_for_state_passing():
    assert "cp_layout=contiguous" in contiguous_problem(ParallelizeOptions(cp_layout="zigzag"), 2)
    assert contiguous_problem(ParallelizeOptions(cp_layout="contiguous"), 2) is None
    assert contiguous_problem(ParallelizeOptions(cp_mode="ulysses"), 2) is None  # a ring of one: in order
