"""How to shard a MatFormer: the LLM's plan, with checks of the nested widths."""
from models.llm.parallelize import PLAN, check_layout as llm_check_layout
from models.matformer.model import MatFormerConfig
from parallel.mesh import ParallelDims
from parallel.options import ParallelizeOptions

__all__ = ["PLAN", "check_layout"]


def check_layout(cfg: MatFormerConfig, dims: ParallelDims, options: ParallelizeOptions) -> list[str]:
    problems = llm_check_layout(cfg, dims, options)
    hidden = cfg.ffn_hidden_dim
    for f in cfg.granularities:
        units = f * hidden
        if abs(units - round(units)) > 1e-9 or round(units) % dims.tp:
            problems.append(f"model.granularities: {f:g} of the FFN hidden size {hidden} is {units:g} units, which "
                            f"is not a whole multiple of parallel.tp={dims.tp} (each tp rank holds the same share of "
                            f"every granularity); pick fractions whose units tp divides, or change multiple_of")
    return problems
