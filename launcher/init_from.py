"""`checkpoint.init_from: PATH`: a run that has no checkpoint of its own in run.dir starts from the weights of
PATH, under any layout: weights only, at step 0, with a fresh optimizer, schedule and data position. Once the run
has saved a checkpoint, a restart resumes from it and never reads PATH again.

PATH is recognized by its files as one of FORMATS (the first that recognizes it), each checked against the run's
model before any process group starts (one line on any problem), then read by every rank after its model parts
are materialized and initialized (launcher/weights.py: StartingWeights).
"""
from pathlib import Path

from launcher.checkpoint import META_FILE, Checkpointer, ModelState, check_complete, check_same_model, find_checkpoint
from launcher.deepspeed_import import DEEPSPEED_FORMAT
from launcher.errors import UserError
from launcher.hf_import import HF_FORMAT
from launcher.weights import StartingWeights, WeightFormat
from models.spec import ModelSpec, architecture


def _is_native(path: Path) -> bool:
    return (path / META_FILE).is_file() or (path / "checkpoints" / "latest").is_file()


def _open_native(path: Path, spec: ModelSpec, model_cfg, where: str) -> StartingWeights:
    """Another run's checkpoint (any layout): its model tensors only, resharded by DCP to this run's layout."""
    checkpoint, _ = find_checkpoint(path)
    saved = check_complete(checkpoint)
    check_same_model(saved["meta"], spec.name, architecture(model_cfg), checkpoint)

    def load(parts):  # collective: every rank reads its shards of its parts' parameters, nothing else
        Checkpointer(checkpoint.parent.parent, keep_last=0, rank=0).load(checkpoint, {"model": ModelState(parts)})

    return StartingWeights(f"the weights of {checkpoint} (step {saved['meta']['step']})", load,
                           tokenizer=saved["meta"].get("tokenizer"))


NATIVE_FORMAT = WeightFormat("a shardwright run directory or one of its checkpoints/step-<N>", _is_native, _open_native)
FORMATS = (NATIVE_FORMAT, HF_FORMAT, DEEPSPEED_FORMAT)


def open_starting_weights(path: Path | str, spec: ModelSpec, model_cfg) -> StartingWeights:
    """The weights at `path` (checkpoint.init_from) checked against the run's model; UserError otherwise."""
    path = Path(path)
    where = f"checkpoint.init_from={path}"
    if not path.is_dir():
        raise UserError(f"{where} does not exist; pass " + " or ".join(f.name for f in FORMATS))
    for weight_format in FORMATS:
        if weight_format.recognizes(path):
            return weight_format.open(path, spec, model_cfg, where)
    raise UserError(f"{where} is none of the formats a run starts from: " + "; ".join(f.name for f in FORMATS))
