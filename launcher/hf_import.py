"""Starting a run from a Hugging Face model directory (config.json + safetensors, one file or shards with
model.safetensors.index.json): one of the formats of `checkpoint.init_from` (launcher/init_from.py).

    preflight (no process group): the family's "hf" StateDictAdapter, config.json against the run's model config
    (adapter.config_problems), every tensor's name and shape (read from the safetensors headers) against the
    run's model built on the meta device
    train, after every part is materialized and initialized: each rank reads the HF tensors of one layer at a time,
    maps them (adapter.to_native) and copies those of the parameters it holds, keeping its shard of a DTensor

Only safetensors are read: a pickled checkpoint (pytorch_model.bin, *.pt) is refused, never unpickled. Each rank
reads the full tensors of each layer it holds parameters of and keeps its shards: simple, and the peak is one
layer per rank; reading only the shard's rows (safetensors slices) would cut the reading under FSDP/TP.
"""
from pathlib import Path

from launcher.errors import UserError
from launcher.weights import (LayerwiseMapping, StartingWeights, WeightFormat, check_tensors, copy_streamed,
                             expected_shapes, in_order, open_safetensors, read_json_object)
from models.spec import ModelSpec

INDEX_FILE = "model.safetensors.index.json"
# Formats torch.load would unpickle (arbitrary code): named so the refusal says what was found.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _recognizes(path: Path) -> bool:
    return (path / "config.json").is_file()


def _open(directory: Path, spec: ModelSpec, model_cfg, where: str) -> StartingWeights:
    """The weights of `directory` checked against the run's model."""
    adapter = spec.state_dict_adapters.get("hf")
    if adapter is None:
        raise UserError(f"{where}: model family {spec.name} has no Hugging Face mapping, so it cannot start from a "
                        f"Hugging Face checkpoint; drop checkpoint.init_from")
    problems = adapter.config_problems(read_json_object(directory / "config.json", where), model_cfg)
    if problems:
        raise UserError(f"{where} does not fit the run's model: {'; '.join(problems)}")
    shapes = _tensor_shapes(directory, where)
    mapping = LayerwiseMapping({name: shape for name, (_, shape) in shapes.items()},
                               lambda tensors: adapter.to_native(tensors, model_cfg), where)
    check_tensors(where, mapping.found, expected_shapes(spec, model_cfg))

    def load(names: list[str]) -> dict:
        tensors = {}
        for file, in_file in in_order({name: shapes[name][0] for name in names}):
            with open_safetensors(file, where) as f:
                tensors |= {name: f.get_tensor(name) for name in in_file}
        return tensors

    return StartingWeights(f"the Hugging Face weights in {directory} ({len(shapes)} tensors)",
                           lambda parts: copy_streamed(parts, lambda wanted: mapping.read(wanted, load)))


HF_FORMAT = WeightFormat("a Hugging Face model directory (config.json, *.safetensors)", _recognizes, _open)


def _tensor_shapes(directory: Path, where: str) -> dict[str, tuple[Path, list[int]]]:
    """Each tensor's (file, shape), from the safetensors headers: the index's weight map, or every *.safetensors."""
    weight_map = None
    if (directory / INDEX_FILE).is_file():
        index = read_json_object(directory / INDEX_FILE, where)
        if not isinstance(index.get("weight_map"), dict):
            raise UserError(f"{where}: {directory / INDEX_FILE} has no weight_map (tensor name -> file)")
        weight_map = {name: directory / file for name, file in index["weight_map"].items()}
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
        with open_safetensors(file, where) as f:
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
