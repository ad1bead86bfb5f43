"""The DeltaNet model on one process: causality (convs included), the hybrid layout, exact FLOPs'
weight part, init, and the refusal of the zigzag cp layout."""
import torch

from models import FAMILIES, get_model_spec
from models.deltanet.model import DeltaNet, DeltaNetConfig, DeltaNetLayer, ShortConvolution, flops_per_token
from models.deltanet.parallelize import contiguous_problem
from models.llm.model import Attention
from models.spec import ParallelizeOptions
from parallel.init import init_parameters


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


def test_flops_weight_part_counts_every_matmul_parameter():
    """With the sequence-dependent terms removed, 6 FLOPs per matmul weight (embedding excluded)."""
    model = _model(use_gate=True)
    cfg = model.cfg
    n = sum(p.numel() for name, p in model.named_parameters()
            if name.endswith(("proj.weight", "w1.weight", "w2.weight", "w3.weight", "output.weight")))
    from models.deltanet.model import delta_rule_flops
    conv = 2 * cfg.conv_size * 3 * cfg.dim
    seq_terms = 3 * cfg.n_layers * (conv + cfg.n_heads * delta_rule_flops(cfg, 16))
    assert abs(flops_per_token(cfg, 16) - seq_terms - 6 * n) < 1e-6


def test_zigzag_refused_for_state_passing():
    assert "cp_layout=contiguous" in contiguous_problem(ParallelizeOptions(cp_layout="zigzag"), 2)
    assert contiguous_problem(ParallelizeOptions(cp_layout="contiguous"), 2) is None
    assert contiguous_problem(ParallelizeOptions(cp_mode="ulysses"), 2) is None  # a ring of one: in order
