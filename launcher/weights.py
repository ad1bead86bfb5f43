"""What every format a run can start from (`checkpoint.init_from`, launcher/init_from.py) shares: the checked
weights a run starts from, and the checks and the streamed copy into a rank's model parts."""
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from launcher.errors import UserError
from launcher.safe_dcp import load as safe_load
from models.spec import ModelSpec
from parallel.init import canonical_name, copy_full, stored_orders, to_stored


@dataclass(frozen=True)
class StartingWeights:
    """Weights checked against the run's model before any process group starts."""
    description: str  # what the log says the run starts from, e.g. "the Hugging Face weights in DIR (12 tensors)"
    # load(parts): fill this rank's materialized and initialized model parts (its shard of each DTensor; the
    # parameters of other pipeline stages are not read). Every rank calls it at the same point: it may be collective.
    load: Callable[[list[nn.Module]], None]
    # The fingerprint of the tokenizer the weights were trained with, where the format records it (the run's data
    # must then use the same one); None: the format's own checks (e.g. the vocabulary size) are all there is.
    tokenizer: str | None = None


@dataclass(frozen=True)
class WeightFormat:
    """A checkpoint format a run can start from."""
    name: str  # e.g. "a Hugging Face model directory (config.json, *.safetensors)": what the refusal lists
    recognizes: Callable[[Path], bool]  # cheap: file names only
    # open(path, spec, model_cfg, where): the checked weights; UserError (one line, prefixed by `where`) otherwise
    open: Callable[[Path, ModelSpec, Any, str], StartingWeights]


def read_json_object(path: Path, where: str) -> dict:
    """The JSON object `path` holds (a config.json, an index), or the refusal naming the file."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise UserError(f"{where}: {path} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: {path} holds a JSON {type(value).__name__}, not an object")
    return value


@contextmanager
def open_safetensors(path: Path, where: str):
    """safe_open of `path`, a damaged file (truncated, not safetensors) refused naming it, also when a tensor is
    read."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise UserError(f"{where}: {path} is not a readable safetensors file ({e}); copy it again") from None


def expected_shapes(spec: ModelSpec, model_cfg) -> dict[str, tuple[int, ...]]:
    """The run's parameters (canonical names, tied ones under each name) and shapes, from the model built on the
    meta device."""
    with torch.device("meta"):
        return {canonical_name(name): tuple(p.shape)
                for name, p in spec.model_cls(model_cfg).named_parameters(remove_duplicate=False)}


def check_tensors(where: str, found: dict[str, tuple[str | None, tuple[int, ...]]],
                  expected: dict[str, tuple[int, ...]]) -> None:
    """`found`: each tensor of the checkpoint by its own name -> (the parameter it fills, None for none; its shape
    in the native layout). Every parameter must be filled once, with its shape (UserError naming each problem)."""
    unexpected = sorted(name for name, (native, _) in found.items() if native not in expected)
    filled: dict[str, str] = {}
    for name, (native, _) in found.items():
        if native in filled:
            raise UserError(f"{where}: tensors {filled[native]} and {name} both fill {native}")
        if native in expected:
            filled[native] = name
    missing = sorted(set(expected) - set(filled))
    if missing or unexpected:
        raise UserError(f"{where} does not hold the run's parameters: "
                        + "; ".join(f"{what}: {', '.join(names)}" for what, names in
                                    (("missing (no tensor for)", missing), ("unexpected tensors", unexpected))
                                    if names))
    for native, name in filled.items():
        if tuple(found[name][1]) != expected[native]:
            raise UserError(f"{where}: tensor {name} has shape {list(found[name][1])} but the run's {native} has "
                            f"{list(expected[native])}")


@torch.no_grad()
def copy_streamed(parts: list[nn.Module], read: Callable[[set[str]], Iterable[tuple[str, torch.Tensor]]]) -> int:
    """Fill the parameters of this rank's `parts` from `read(wanted names)`, which yields (canonical name, full
    tensor in the native layout) one at a time; each rank keeps its shard (of the tensor in its stored order,
    parallel/init.py). Returns how many were copied (a tied parameter under each of its names)."""
    params = {canonical_name(name): p for part in parts for name, p in part.named_parameters(remove_duplicate=False)}
    orders = stored_orders(parts)
    copied = 0
    for name, full in read(set(params)):
        full = to_stored(full.to(device=params[name].device, dtype=params[name].dtype), orders.get(name))
        copy_full(params[name], full)
        copied += 1
    if copied != len(params):
        raise RuntimeError(f"{len(params) - copied} of this rank's {len(params)} parameters were not read: a bug in "
                           f"the format's reader")
    return copied


_LAYER_PREFIX = re.compile(r"(.*\.layers\.\d+)\.")
_NATIVE_LAYER_PREFIX = re.compile(r"(layers\.\d+)\.")  # of canonical names: a layer's tensors


def layer_group(name: str) -> str:
    """The tensors an adapter maps together: a layer's ("model.layers.3"), or a tensor outside the layers alone."""
    layer = _LAYER_PREFIX.match(name)
    return layer[1] if layer else name


def native_layer_group(name: str) -> str:
    """layer_group of a canonical name: its layer ("layers.3"), or the tensor alone outside the layers."""
    layer = _NATIVE_LAYER_PREFIX.match(name)
    return layer[1] if layer else name


class LayerwiseMapping:
    """A checkpoint in another format's names, mapped to the run's parameters by a state-dict adapter's to_native
    one layer's tensors at a time (a native tensor may stack or split several of the format's), so that neither
    the check nor the reading ever holds more than a layer: `check` maps the shapes on the meta device,
    `read` the tensors."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], to_native: Callable[[dict], dict], where: str):
        self.to_native, self.where = to_native, where
        self.groups: dict[str, list[str]] = {}
        for name in shapes:
            self.groups.setdefault(layer_group(name), []).append(name)
        self.found: dict[str, tuple[str, tuple[int, ...]]] = {}  # for check_tensors
        self.group_of: dict[str, str] = {}  # native name -> its group
        for group, names in self.groups.items():
            for native, tensor in self._map({n: torch.empty(shapes[n], device="meta") for n in names}).items():
                self.found[f"{native} (from {group})"] = (native, tuple(tensor.shape))
                self.group_of[native] = group

    def _map(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            return self.to_native(tensors)
        except ValueError as e:  # named by the adapter; when reading, a value the shapes could not show
            raise UserError(f"{self.where}: {e}") from None

    def read(self, wanted: set[str], load: Callable[[list[str]], dict[str, torch.Tensor]]):
        """(native name, tensor) of the `wanted` parameters, the groups that hold them loaded by `load(names)` one
        at a time."""
        for group in dict.fromkeys(self.group_of[name] for name in self.group_of if name in wanted):
            yield from ((n, t) for n, t in self._map(load(self.groups[group])).items() if n in wanted)


def in_order(items: dict[str, Path]) -> Iterator[tuple[Path, list[str]]]:
    """The names of `items` (name -> file) grouped by file, files in sorted order: each file opened once."""
    for file in sorted(set(items.values())):
        yield file, [name for name, name_file in items.items() if name_file == file]


def checkpoint_reader(checkpoint: Path, saved: dict, mapping: Callable[[dict], dict], dtype: torch.dtype):
    """(layout, read) of a checkpoint's model tensors mapped by `mapping` (a state-dict adapter's from_native), for
    writing them out a part at a time: `layout` names them (meta tensors), `read(names)` returns them in
    `dtype`. The
    mapping is given one layer's tensors at a time, first as meta tensors; `read` loads the layers it needs
    straight from DCP in this process (any layout: DCP reassembles each tensor), so the model is never whole in
    memory."""
    groups: dict[str, list[str]] = {}
    for key in saved["sizes"]:
        if key.startswith("model."):
            name = key.removeprefix("model.")
            groups.setdefault(native_layer_group(name), []).append(name)
    layout, group_of = {}, {}
    for group, names in groups.items():
        meta = {n: torch.empty(saved["sizes"][f"model.{n}"], dtype=saved["dtypes"][f"model.{n}"], device="meta")
                for n in names}
        for name, tensor in mapping(meta).items():
            layout[name], group_of[name] = tensor, group

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for group in dict.fromkeys(group_of[name] for name in names):
            native = {n: torch.empty(saved["sizes"][f"model.{n}"], dtype=saved["dtypes"][f"model.{n}"])
                      for n in groups[group]}
            safe_load({"model": native}, checkpoint, no_dist=True)
            tensors |= {name: t.to(dtype) for name, t in mapping(native).items() if name in names}
        return tensors

    return layout, read
