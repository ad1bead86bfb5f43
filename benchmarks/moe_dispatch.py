"""MoE expert compute and expert-parallel traffic, as JSON.

1. Expert compute on CPU (fp32, forward + backward): the grouped path the model uses
   (models/moe/model.py: grouped_swiglu, one bmm over rows padded per expert) against a Python
   loop over experts (looped_swiglu), for the tiny config's shapes and a wider one, with routing
   drawn from a balanced and a skewed (Zipf-like) router. tokens/s counts routed tokens (each
   token k assignments).
2. All-to-all bytes per step per rank under expert parallelism, from the config: every MoE layer
   sends the rows routed to other ranks' experts out (dispatch) and their outputs back (combine)
   in the forward, and the same two volumes as gradients in the backward:
       bytes = n_moe_layers * 4 * (k * tokens_per_rank * (ep - 1) / ep) * dim * bytes_per_element
   with balanced routing (skew moves the volume between ranks, the mean stays).

    .venv/bin/python benchmarks/moe_dispatch.py [--repeats 5] [--out benchmarks/results/moe_dispatch.json]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.config import load_config  # noqa: E402
from launcher.metrics import describe_machine  # noqa: E402
from models.moe.model import grouped_swiglu, looped_swiglu  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def routed_counts(n_tokens: int, k: int, n_experts: int, skew: float, generator) -> list[int]:
    weights = 1.0 / torch.arange(1, n_experts + 1).double() ** skew
    experts = torch.multinomial(weights.expand(n_tokens, -1), k, generator=generator)
    return torch.bincount(experts.flatten(), minlength=n_experts).tolist()


def time_path(fn, x, counts, weights, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        xs = x.detach().requires_grad_()
        ws = [w.detach().requires_grad_() for w in weights]
        start = time.perf_counter()
        fn(xs, counts, *ws).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def compute_case(name, n_tokens, k, n_experts, dim, hidden, skew, repeats):
    g = torch.Generator().manual_seed(0)
    counts = routed_counts(n_tokens, k, n_experts, skew, g)
    x = torch.randn(sum(counts), dim, generator=g)
    weights = [torch.randn(n_experts, dim, hidden, generator=g) * 0.02, torch.randn(n_experts, dim, hidden, generator=g)
               * 0.02, torch.randn(n_experts, hidden, dim, generator=g) * 0.02]
    grouped = time_path(grouped_swiglu, x, counts, weights, repeats)
    looped = time_path(looped_swiglu, x, counts, weights, repeats)
    return {"case": name, "tokens": n_tokens, "top_k": k, "experts": n_experts, "dim": dim, "hidden": hidden,
            "skew": skew, "max_over_mean_load": max(counts) / (sum(counts) / n_experts),
            "grouped_tokens_per_s": n_tokens / grouped, "loop_tokens_per_s": n_tokens / looped,
            "grouped_speedup": looped / grouped}


def traffic(config: Path, ep: int, world: int, bytes_per_element: int) -> dict:
    cfg = load_config(config, [])
    m, t = cfg.model_config(), cfg.train
    tokens_per_rank = t.global_batch_size * t.seq_len // world
    leaving = m.top_k * tokens_per_rank * (ep - 1) / ep
    per_layer = 4 * leaving * m.dim * bytes_per_element
    return {"config": str(config.relative_to(REPO)), "ep": ep, "world": world,
            "tokens_per_rank_per_step": tokens_per_rank,
            "moe_layers": m.n_moe_layers, "bytes_per_element": bytes_per_element,
            "all_to_all_bytes_per_step_per_rank": m.n_moe_layers * per_layer,
            "all_to_all_gib_per_step_per_rank": m.n_moe_layers * per_layer / 2**30}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "moe_dispatch.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    compute = [compute_case(f"{shape}-{routing}", n, 2, e, d, h, skew, args.repeats)
               for shape, n, e, d, h in (("tiny", 2048, 8, 128, 128), ("wide", 2048, 32, 256, 128))
               for routing, skew in (("balanced", 0.0), ("skewed", 1.0))]
    result = {
        "machine": describe_machine(),
        "expert_compute_fwd_bwd_fp32_cpu": compute,
        "all_to_all": [traffic(REPO / "configs/moe/tiny.yaml", 2, 2, 4),
                       traffic(REPO / "configs/moe/8x1b.yaml", 8, 32, 2)],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
