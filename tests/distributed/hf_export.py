"""`convert to-hf` of a checkpoint a multi-process layout wrote: what the export must hold and compute."""
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

FP32_TOLERANCE = 1e-5  # of the largest logit


def checkpoint_as_hf(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's latest checkpoint read straight from DCP (no model, no layout) and mapped by its family's adapter."""
    from launcher.checkpoint import Checkpointer, check_complete
    from launcher.config import load_config
    from models import get_model_spec

    checkpoint = Checkpointer(run_dir, 1, 0).latest_dir()
    sizes = check_complete(checkpoint)["sizes"]
    raw = {"model": {k.removeprefix("model."): torch.empty(s) for k, s in sizes.items() if k.startswith("model.")}}
    dcp.load(raw, checkpoint_id=checkpoint, no_dist=True)
    cfg = load_config(run_dir / "config.yaml")
    return get_model_spec(cfg.model.family).state_dict_adapters["hf"].from_native(raw["model"], cfg.model_config())


def export_and_check(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """Export the run (fp32) and check it: its tensors are the checkpoint's bit for bit, and transformers'
    model loaded from it (nothing missing or unexpected) computes our model's logits on the same tokens.
    Returns the exported tensors."""
    import transformers
    from safetensors.torch import load_file

    from launcher.checkpoint import Checkpointer, ModelState
    from launcher.config import load_config
    from launcher.convert import build_model, convert
    from models import get_model_spec

    convert("to-hf", run_dir, out, log=lambda _: None)
    exported = {name: t for file in sorted(out.glob("*.safetensors")) for name, t in load_file(file).items()}
    want = checkpoint_as_hf(run_dir)
    assert exported.keys() == want.keys() and len(want) > 10
    assert all(torch.equal(exported[name], tensor) for name, tensor in want.items())

    cfg = load_config(run_dir / "config.yaml")
    ours = build_model(get_model_spec(cfg.model.family), cfg)
    dcp.load({"model": ModelState([ours])}, checkpoint_id=Checkpointer(run_dir, 1, 0).latest_dir(), no_dist=True)
    # Eager attention and experts: transformers' reference paths (its fused expert kernels round differently).
    experts = {"experts_implementation": "eager"} if cfg.model.family == "moe" else {}
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True, **experts)
    assert not any(info.values()), info
    tokens = torch.randint(0, cfg.model_config().vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        our_logits = ours.eval()(tokens)
        difference = (theirs.eval()(tokens).logits - our_logits).abs().max() / our_logits.abs().max()
    assert difference <= FP32_TOLERANCE, difference
    return exported
