"""MoE expert compute and expert-parallel traffic, as JSON.

1. Expert compute on CPU (fp32, forward + backward): the default path the model uses
   (models/moe/model.py: grouped_swiglu; on CPU one mm per expert on its slice of the sorted rows)
   against the reference loop over experts (looped_swiglu, which indexes rows and weights per
   expert), for the tiny config's shapes and a wider one, with routing drawn from a balanced and a
   skewed (Zipf-like) router. The two paths alternate within every repeat (the best of `repeats`
   each is kept), so a change of load on a shared machine hits both alike. One intra-op thread by
   default: on a small machine shared with other processes, more threads than idle cores measure
   the contention of the threads (both paths run the same matmuls), not the paths. tokens/s counts
   tokens (each token k routed assignments).
2. All-to-all bytes per step per rank under expert parallelism, from the config: every MoE layer
   sends the rows routed to other ranks' experts out (dispatch) and their outputs back (combine)
   in the forward, and the same two volumes as gradients in the backward:
       bytes = n_moe_layers * 4 * (k * tokens_per_rank * (ep - 1) / ep) * dim * bytes_per_element
   with balanced routing (skew moves the volume between ranks, the mean stays).

    .venv/bin/python benchmarks/moe_dispatch.py [--repeats 30] [--threads 1] [--out benchmarks/results/moe_dispatch.json]
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


def time_once(fn, x, counts, weights) -> float:
    xs = x.detach().requires_grad_()
    ws = [w.detach().requires_grad_() for w in weights]
    start = time.perf_counter()
    fn(xs, counts, *ws).sum().backward()
    return time.perf_counter() - start


def time_paths(paths: dict, x, counts, weights, repeats: int) -> dict:
    """Best time of each path over `repeats` rounds, each round running every path once in turn."""
    for fn in paths.values():  # warm-up
        time_once(fn, x, counts, weights)
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats):
        for name, fn in paths.items():
            best[name] = min(best[name], time_once(fn, x, counts, weights))
    return best


def compute_case(name, n_tokens, k, n_experts, dim, hidden, skew, repeats):
    g = torch.Generator().manual_seed(0)
    counts = routed_counts(n_tokens, k, n_experts, skew, g)
    x = torch.randn(sum(counts), dim, generator=g)
    weights = [torch.randn(n_experts, dim, hidden, generator=g) * 0.02, torch.randn(n_experts, dim, hidden, generator=g)
               * 0.02, torch.randn(n_experts, hidden, dim, generator=g) * 0.02]
    best = time_paths({"default": grouped_swiglu, "loop": looped_swiglu}, x, counts, weights, repeats)
    return {"case": name, "tokens": n_tokens, "top_k": k, "experts": n_experts, "dim": dim, "hidden": hidden,
            "skew": skew, "max_over_mean_load": max(counts) / (sum(counts) / n_experts),
            "empty_experts": counts.count(0),
            "default_tokens_per_s": n_tokens / best["default"], "loop_tokens_per_s": n_tokens / best["loop"],
            "default_over_loop": best["loop"] / best["default"]}


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
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "moe_dispatch.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = describe_machine()
    compute = [compute_case(f"{shape}-{routing}", n, 2, e, d, h, skew, args.repeats)
               for shape, n, e, d, h in (("tiny", 2048, 8, 128, 128), ("wide", 2048, 32, 256, 128))
               for routing, skew in (("balanced", 0.0), ("skewed", 1.0))]
    result = {
        "machine": machine,
        "load_average_after": os.getloadavg(),
        "expert_compute_fwd_bwd_fp32_cpu": compute,
        "all_to_all": [traffic(REPO / "configs/moe/tiny.yaml", 2, 2, 4),
                       traffic(REPO / "configs/moe/8x1b.yaml", 8, 32, 2)],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
