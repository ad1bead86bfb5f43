"""The CUDA grouped-GEMM expert path (torch._grouped_mm, bf16) against a loop over experts."""
import pytest
import torch

from models.moe.model import grouped_swiglu, looped_swiglu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"),
                                reason="needs CUDA and torch._grouped_mm")


@pytest.mark.parametrize("counts", [[64, 0, 128, 32, 16, 80, 48, 144],  # multiples of 16 rows, one empty expert
                                    [61, 0, 130, 33, 1, 80, 47, 150]])  # what dropless routing hands it
@pytest.mark.parametrize("autocast", [False, True])  # True: fp32 inputs under bf16 autocast, cast for grouped_mm
def test_grouped_mm_matches_loop_forward_and_backward(counts, autocast):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(sum(counts), 256, device="cuda", generator=g, dtype=torch.bfloat16)
    weights = [torch.randn(8, 256, 128, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05,
               torch.randn(8, 256, 128, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05,
               torch.randn(8, 128, 256, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05]
    results = []
    for fn in (grouped_swiglu, looped_swiglu):
        xs = x.clone().float().requires_grad_() if autocast else x.clone().requires_grad_()
        ws = [(w.clone().float() if autocast else w.clone()).requires_grad_() for w in weights]
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            y = fn(xs, counts, *ws)
        y.float().pow(2).sum().backward()
        results.append([y.float(), xs.grad.float(), *(w.grad.float() for w in ws)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
