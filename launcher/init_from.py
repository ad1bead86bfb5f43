"""`checkpoint.init_from: PATH`: a run that has no checkpoint of its own in run.dir starts from the weights of
PATH, under any layout: weights only, at step 0, with a fresh optimizer, schedule and data position. Once the run
has saved a checkpoint, a restart resumes from it and never reads PATH again.

PATH is recognized by its files as one of starting_formats (the first that recognizes it), each checked against the
run's model (one line on any problem) before anything reads its tensors: in the launcher before any worker starts,
and again in the world, where the ranks verify a shardwright checkpoint's checksums together (each hashing its share
of the files); it is then read by every rank after its model parts are materialized and initialized
(launcher/weights.py: StartingWeights). A native checkpoint of another family
starts the run when the run's family lists it in ModelSpec.starts_from (e.g. a language model that gains image
inputs); its tensors are mapped by that function.
"""
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from launcher.checkpoint import META_FILE, Checkpointer, ModelState, check_complete, check_same_model, find_checkpoint
from launcher.deepspeed_import import DEEPSPEED_FORMAT
from launcher.errors import UserError
from launcher.hf_import import HF_FORMAT
from launcher.megatron_import import MEGATRON_FORMAT
from launcher.weights import (StartingWeights, WeightFormat, check_tensors, checkpoint_reader, copy_streamed,
                              expected_shapes, native_layer_group, open_safetensors)
from models.spec import ModelSpec, architecture


def _is_native(path: Path) -> bool:
    return (path / META_FILE).is_file() or (path / "checkpoints" / "latest").is_file()


def _open_native(path: Path, spec: ModelSpec, model_cfg, where: str, check: Callable[[Path], dict]
                 ) -> StartingWeights:
    """Another run's checkpoint (any layout), verified by `check`: its model tensors only, resharded by DCP to this
    run's layout."""
    checkpoint, _ = find_checkpoint(path)
    saved = check(checkpoint)
    if saved["meta"].get("family") != spec.name and saved["meta"].get("family") in spec.starts_from:
        return _open_other_family(checkpoint, saved, spec, model_cfg, where)
    check_same_model(saved["meta"], spec.name, architecture(model_cfg), checkpoint)

    def load(parts):  # collective: every rank reads its shards of its parts' parameters, nothing else
        Checkpointer(checkpoint.parent.parent, keep_last=0, rank=0).load(checkpoint, {"model": ModelState(parts)})

    unverified = "" if saved["verified"] else ", unverified: it has no checksums (saved by an older version)"
    return StartingWeights(f"the weights of {checkpoint} (step {saved['meta']['step']}{unverified})", load,
                           tokenizer=saved["meta"].get("tokenizer"))


def _open_other_family(checkpoint: Path, saved: dict, spec: ModelSpec, model_cfg, where: str) -> StartingWeights:
    """A checkpoint of a family the run's family starts from (ModelSpec.starts_from, e.g. a language model that
    gains image inputs): the same architecture fields; its tensors read from DCP a layer at a time on every rank
    (any layout) and mapped to the run's parameters."""
    family = saved["meta"]["family"]
    check_same_model(saved["meta"], family, architecture(model_cfg), checkpoint)

    def mapped(tensors: dict) -> dict:
        try:
            return spec.starts_from[family](tensors, model_cfg)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None

    layout, read = checkpoint_reader(checkpoint, saved, mapped, torch.float32)
    check_tensors(where, {name: (name, tuple(t.shape)) for name, t in layout.items()}, expected_shapes(spec, model_cfg))

    def stream(wanted: set[str]):
        names = [name for name in layout if name in wanted]
        for layer in dict.fromkeys(map(native_layer_group, names)):  # each layer's tensors read together
            yield from read([name for name in names if native_layer_group(name) == layer]).items()

    return StartingWeights(f"the {family} weights of {checkpoint} (step {saved['meta']['step']}) mapped to "
                           f"{spec.name}", lambda parts: copy_streamed(parts, stream),
                           tokenizer=saved["meta"].get("tokenizer"))


# The safetensors metadata entry of a consolidated file (`convert to-file`): JSON of the checkpoint's meta.json
# fields family, model (architecture), tokenizer and step.
CONSOLIDATED_KEY = "shardwright"


def _is_consolidated(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def _open_consolidated(path: Path, spec: ModelSpec, model_cfg, where: str) -> StartingWeights:
    """A consolidated file: canonical names, read a tensor at a time."""
    with open_safetensors(path, where) as f:
        metadata = f.metadata() or {}
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    if CONSOLIDATED_KEY not in metadata:
        raise UserError(f"{where} is a safetensors file without shardwright's metadata (`convert to-file` writes it); "
                        f"for a Hugging Face checkpoint pass its directory (with config.json)")
    try:
        record = json.loads(metadata[CONSOLIDATED_KEY])
    except ValueError:
        raise UserError(f"{where}: the {CONSOLIDATED_KEY} metadata of {path} is not JSON: the file is damaged") from None
    check_same_model(record, spec.name, architecture(model_cfg), path)
    check_tensors(where, {name: (name, shape) for name, shape in shapes.items()}, expected_shapes(spec, model_cfg))

    def read(wanted: set[str]):
        for name in (name for name in shapes if name in wanted):
            with open_safetensors(path, where) as f:  # reopened: the pages read are unmapped after each tensor
                yield name, f.get_tensor(name)

    return StartingWeights(f"the weights in {path} (step {record['step']})", lambda parts: copy_streamed(parts, read),
                           tokenizer=record["tokenizer"])


CONSOLIDATED_FORMAT = WeightFormat("a consolidated .safetensors file (`convert to-file`)", _is_consolidated,
                                   _open_consolidated)


def starting_formats(check: Callable[[Path], dict]) -> tuple[WeightFormat, ...]:
    """The formats a run starts from, in the order they are tried; `check` verifies a shardwright checkpoint, the
    only format that records checksums (check_complete, or check_complete_everywhere in a world)."""
    native = WeightFormat("a shardwright run directory or one of its checkpoints/step-<N>", _is_native,
                          partial(_open_native, check=check))
    return native, CONSOLIDATED_FORMAT, HF_FORMAT, MEGATRON_FORMAT, DEEPSPEED_FORMAT


def open_starting_weights(path: Path | str, spec: ModelSpec, model_cfg, check: Callable[[Path], dict] = check_complete
                          ) -> StartingWeights:
    """The weights at `path` (checkpoint.init_from) checked against the run's model, a shardwright checkpoint
    verified by `check`; UserError otherwise."""
    path = Path(path)
    where = f"checkpoint.init_from={path}"
    formats = starting_formats(check)
    if not path.exists():
        raise UserError(f"{where} does not exist; pass " + " or ".join(f.name for f in formats))
    for weight_format in formats:
        if weight_format.recognizes(path):
            return weight_format.open(path, spec, model_cfg, where)
    raise UserError(f"{where} is none of the formats a run starts from: " + "; ".join(f.name for f in formats))
