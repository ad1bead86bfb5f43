"""`checkpoint.init_from`: a run without a checkpoint of its own starts from the weights of a Hugging Face model
directory (config.json + safetensors, one file or shards with model.safetensors.index.json), under any layout.

    preflight (no process group): the family's "hf" StateDictAdapter, config.json against the run's model config
    (adapter.config_problems), every tensor's name and shape (read from the safetensors headers) against the
    run's model built on the meta device -> HFWeights
    train, after every part is materialized and initialized: each rank copies, a tensor at a time, the tensors of
    the parameters it holds (adapter.native_tensor), keeping its shard of a DTensor

Only safetensors are read: a pickled checkpoint (pytorch_model.bin, *.pt) is refused, never unpickled. Each rank
reads the full tensor of each parameter it holds (one at a time) and keeps its shard: simple, and the peak is one
full parameter per rank; reading only the shard's rows (safetensors slices) would cut the reading under FSDP/TP.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from launcher.errors import UserError
from models.spec import ModelSpec, StateDictAdapter
from parallel.init import canonical_name, copy_full

INDEX_FILE = "model.safetensors.index.json"
# Formats torch.load would unpickle (arbitrary code): named so the refusal says what was found.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class HFWeights:
    """A checked Hugging Face directory: each of its tensors' safetensors file and canonical parameter name."""
    directory: Path
    files: dict[str, Path]  # HF tensor name -> its file
    native_names: dict[str, str]  # HF tensor name -> the parameter it fills


def _safe_open():
    try:
        from safetensors import safe_open
    except ImportError:
        raise UserError("checkpoint.init_from reads safetensors: pip install 'shardwright[hf]'") from None
    return safe_open


def check_hf_weights(directory: Path | str, spec: ModelSpec, model_cfg) -> HFWeights:
    """The weights of `directory` checked against the run's model (UserError, one line, on any problem)."""
    directory = Path(directory)
    where = f"checkpoint.init_from={directory}"
    if not directory.is_dir():
        raise UserError(f"{where} does not exist; pass a Hugging Face model directory (config.json, *.safetensors)")
    adapter = spec.state_dict_adapters.get("hf")
    if adapter is None:
        raise UserError(f"{where}: model family {spec.name} has no Hugging Face mapping, so it cannot start from a "
                        f"Hugging Face checkpoint; drop checkpoint.init_from")
    if not (directory / "config.json").is_file():
        raise UserError(f"{where} has no config.json; pass a Hugging Face model directory")
    problems = adapter.config_problems(json.loads((directory / "config.json").read_text()), model_cfg)
    if problems:
        raise UserError(f"{where} does not fit the run's model: {'; '.join(problems)}")
    shapes = _tensor_shapes(directory, where)
    with torch.device("meta"):
        expected = {canonical_name(name): tuple(p.shape) for name, p in spec.model_cls(model_cfg).named_parameters()}
    native_names, unexpected = {}, []
    for name in shapes:
        try:
            native_names[name] = adapter.native_name(name)
        except ValueError:
            unexpected.append(name)
    unexpected += [name for name, native in native_names.items() if native not in expected]
    missing = sorted(set(expected) - set(native_names.values()))
    if missing or unexpected:
        raise UserError(f"{where} does not hold the run's parameters: "
                        + "; ".join(f"{what}: {', '.join(names)}" for what, names in
                                    (("missing (no tensor for)", missing), ("unexpected tensors", sorted(unexpected)))
                                    if names))
    for name, native in native_names.items():
        if tuple(shapes[name][1]) != expected[native]:
            raise UserError(f"{where}: tensor {name} has shape {list(shapes[name][1])} but the run's {native} has "
                            f"{list(expected[native])}")
    return HFWeights(directory, {name: file for name, (file, _) in shapes.items()}, native_names)


def _tensor_shapes(directory: Path, where: str) -> dict[str, tuple[Path, list[int]]]:
    """Each tensor's (file, shape), from the safetensors headers: the index's weight map, or every *.safetensors."""
    weight_map = None
    if (directory / INDEX_FILE).is_file():
        weight_map = {name: directory / file
                      for name, file in json.loads((directory / INDEX_FILE).read_text())["weight_map"].items()}
        files = sorted(set(weight_map.values()))
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise UserError(f"{where}: {INDEX_FILE} names {', '.join(absent)}, which is not there")
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            raise UserError(f"{where} has no *.safetensors" + (
                f", only pickled weights ({', '.join(pickled)}), which are never loaded (unpickling runs arbitrary "
                f"code): convert them to safetensors first" if pickled else ""))
    shapes = {}
    for file in files:
        with _safe_open()(file, framework="pt") as f:
            for name in f.keys():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # the index places it elsewhere (or nowhere): HF loaders read it from there
                if name in shapes:
                    raise UserError(f"{where}: tensor {name} is in both {shapes[name][0].name} and {file.name}")
                shapes[name] = (file, f.get_slice(name).get_shape())
    unlisted = sorted(set(weight_map or ()) - set(shapes))
    if unlisted:
        raise UserError(f"{where}: {INDEX_FILE} places {unlisted[0]} in {weight_map[unlisted[0]].name}, which lacks it")
    return shapes


@torch.no_grad()
def load_hf_weights(parts: list[nn.Module], adapter: StateDictAdapter, weights: HFWeights, model_cfg) -> int:
    """Copy the checked `weights` into this rank's materialized model parts (its shard of each DTensor; a parameter
    of another pipeline stage is skipped), a tensor at a time; returns how many tensors this rank loaded."""
    params = {canonical_name(name): p for part in parts for name, p in part.named_parameters()}
    loaded = 0
    for file in sorted(set(weights.files.values())):
        with _safe_open()(file, framework="pt") as f:
            for name in (n for n, n_file in weights.files.items() if n_file == file):
                param = params.get(weights.native_names[name])
                if param is None:
                    continue
                full = adapter.native_tensor(weights.native_names[name], f.get_tensor(name), model_cfg)
                copy_full(param, full.to(device=param.device, dtype=param.dtype))
                loaded += 1
    return loaded
