"""Packed-document attention on CPU: training tokens/s of the tiny LLM at seq 2048 with document
masks against plain causal attention, on the embedded corpus's real document boundaries; JSON to
benchmarks/results/document_mask.json.

The rows are the training loader's own (GlobalBatchLoader with documents on, data.document_mask),
so the documents per row are the corpus's. Three ways of attending are timed on the same rows and
weights (configs/llm/tiny.yaml's model: dim 128, 4 layers, 4 query / 2 kv heads, vocab 4096; fp32):

- causal: plain causal SDPA over the whole row (no documents: the baseline);
- documents: CoreAttention with document_ids: causal SDPA per document segment (what training runs);
- dense_mask: SDPA with a [B, 1, T, T] bool mask of same-document causal pairs (the rejected
  alternative, for comparison).

Each step is forward + backward of the summed cross entropy; after one untimed warm-up step of each,
the three take turns for `--repeats` rounds (so load from other processes hits all alike), and the
median step of each is reported. The machine is a shared 2-core VM (load average
recorded): ratios within one run are more trustworthy than absolute numbers.

    .venv/bin/python benchmarks/document_mask.py [--seq-len 2048] [--rows 2] [--repeats 5] [--threads 2]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.embedded import prepare_embedded  # noqa: E402
from data.indexed import open_indexed  # noqa: E402
from data.loader import GlobalBatchLoader, PackedTokens  # noqa: E402
from launcher.metrics import describe_machine  # noqa: E402
from models.common.attention import CoreAttention  # noqa: E402
from models.common.loss import cross_entropy_sum  # noqa: E402
from models.llm.model import LLMConfig, Transformer  # noqa: E402
from parallel.init import init_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = LLMConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=4096)


class DenseMaskAttention(CoreAttention):
    """Same-document causal attention through one [B, 1, T, T] bool mask (for comparison only)."""

    def forward(self, q, k, v, document_ids=None):
        visible = (document_ids.unsqueeze(2) == document_ids.unsqueeze(1)).tril().unsqueeze(1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2)


MODES = {"causal": CoreAttention, "documents": CoreAttention, "dense_mask": DenseMaskAttention}


def timed_step(model, batch, mode: str) -> float:
    """Seconds of one training step of `model` on `batch` attending as `mode` (see MODES)."""
    for block in model.layers.values():
        block.attention.core_attention = MODES[mode]()
    documents = {} if mode == "causal" else {"document_ids": batch["document_ids"]}
    positions = None if mode == "causal" else batch["positions"]
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    logits = model(batch["tokens"], positions, **documents)
    cross_entropy_sum(logits, batch["targets"]).backward()
    return time.perf_counter() - start


def segment_lengths(document_ids: torch.Tensor) -> torch.Tensor:
    """Lengths of the document pieces of every row (a document cut by a row boundary counts in each row)."""
    offsets = torch.arange(document_ids.shape[0]).unsqueeze(1) * document_ids.shape[1]
    return torch.unique_consecutive((document_ids + offsets).flatten(), return_counts=True)[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--survey-rows", type=int, default=512, help="rows whose documents are counted (not timed)")
    parser.add_argument("--cache-dir", default="~/.cache/shardwright")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/document_mask.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = prepare_embedded("pydoc", TINY.vocab_size, Path(args.cache_dir).expanduser(), 0.05, log=lambda _: None)
    tokens = PackedTokens(open_indexed(data.train_prefix, TINY.vocab_size), args.seq_len)
    loader = GlobalBatchLoader(tokens, args.rows, args.rows, 0, 1, seed=0, documents=True)
    batch = loader.micro_batches(0)[0]
    lengths = segment_lengths(batch["document_ids"])
    survey = GlobalBatchLoader(loader.samples, args.survey_rows, args.survey_rows, 0, 1, seed=0, documents=True)
    survey_ids = survey.micro_batches(0)[0]["document_ids"]
    documents_per_row = (survey_ids[:, -1] + 1).tolist()

    model = Transformer(TINY)
    init_parameters(model, 0)
    for mode in MODES:  # warm-up
        timed_step(model, batch, mode)
    times = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            times[mode].append(timed_step(model, batch, mode))
    results = {}
    for name in MODES:
        median = statistics.median(times[name])
        results[name] = {"step_s": times[name], "median_step_s": median, "tokens_per_s": args.rows * args.seq_len / median}
        print(f"{name:>10}: {results[name]['tokens_per_s']:.0f} tokens/s (median step {median:.3f} s)", flush=True)
    ratio = results["documents"]["tokens_per_s"] / results["causal"]["tokens_per_s"]
    dense_ratio = results["dense_mask"]["tokens_per_s"] / results["causal"]["tokens_per_s"]
    print(f"timed rows: {len(lengths)} document pieces; survey of {args.survey_rows} rows: "
          f"{statistics.mean(documents_per_row):.2f} documents per row (max {max(documents_per_row)})")
    print(f"documents / causal = {ratio:.3f} (goal >= 0.9); dense mask / causal = {dense_ratio:.3f}")
    report = {
        "what": "training step (fwd+bwd) tokens/s of the tiny LLM with packed-document attention vs plain causal",
        "model": vars(TINY), "seq_len": args.seq_len, "rows": args.rows, "repeats": args.repeats,
        "documents": {"count": len(lengths), "lengths": lengths.tolist(),
                      "mean_length": float(lengths.float().mean())},
        "survey": {"rows": args.survey_rows, "mean_documents_per_row": statistics.mean(documents_per_row),
                   "max_documents_per_row": max(documents_per_row),
                   "mean_piece_length": float(segment_lengths(survey_ids).float().mean())},
        "results": results, "documents_over_causal": ratio, "dense_mask_over_causal": dense_ratio,
        "goal": ">= 0.9", "met": ratio >= 0.9, "machine": describe_machine(),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
