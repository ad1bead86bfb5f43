"""Starting a run from a Megatron-Core dist checkpoint ("torch_dist": metadata.json, .metadata, *.distcp), as
megatron.core.dist_checkpointing.save writes it at any tp/pp, or a Megatron-LM save directory
(latest_checkpointed_iteration.txt -> its iter_<N>/): one of the formats of `checkpoint.init_from`
(launcher/init_from.py). The family's "megatron" StateDictAdapter maps the tensors.

The checkpoint holds global tensors (DCP reshards them at any tp/pp): each layer parameter stacked over the layers
on a leading axis (`decoder.layers.self_attention.linear_qkv.weight` [n_layers, rows, cols]), the rest as is.

    preflight (no process group): every model tensor's name and shape (DCP's metadata) against the run's model built
    on the meta device, mapped to Megatron's layout by the adapter; gpt_config.json, where `convert to-megatron`
    wrote one, against the run's model config (adapter.config_problems). A checkpoint saved by Megatron itself
    records no architecture: its head count, norm eps and RoPE base cannot be checked (docs/conversion.md).
    train: each rank reads, a layer at a time, only the regions of the layers whose parameters it holds (DCP reads
    one row of a stacked tensor), maps them, and keeps its shard.

Never unpickled: common.pt (a pickle of the non-tensor state), the layers' _extra_state entries and the optimizer's
entries (Megatron-LM) are not read; DCP's .metadata is a pickle, read as every checkpoint's is (launcher/safe_dcp.py:
nothing but DCP's own metadata classes is built).
"""
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from launcher.errors import UserError
from launcher.safe_dcp import load as safe_load
from launcher.safe_dcp import read_metadata
from launcher.weights import (StartingWeights, WeightFormat, check_tensors, copy_streamed, expected_shapes,
                             read_json_object)
from models.spec import ModelSpec

METADATA_JSON = "metadata.json"  # Megatron's: {"sharded_backend": "torch_dist", ...}
LATEST_ITERATION = "latest_checkpointed_iteration.txt"  # Megatron-LM's save directory
GPT_CONFIG = "gpt_config.json"  # written by `convert to-megatron`: the GPTModel arguments of the model
STACKED_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def checkpoint_directory(path: Path, where: str) -> Path:
    """The dist checkpoint at `path`: itself, or the latest iteration of a Megatron-LM save directory."""
    latest = path / LATEST_ITERATION
    if not latest.is_file():
        return path
    iteration = latest.read_text().strip()
    if iteration == "release":
        return path / "release"
    if not iteration.isdigit():
        raise UserError(f"{where}: {latest} holds {iteration[:40]!r}, not an iteration number")
    return path / f"iter_{int(iteration):07d}"


def _recognizes(path: Path) -> bool:
    return (path / METADATA_JSON).is_file() or (path / LATEST_ITERATION).is_file()


class _RegionPlanner(DefaultLoadPlanner):
    """Reads regions of checkpoint tensors: state_dict maps each key to (its region's offsets, a tensor of the
    region's shape to fill)."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        super().__init__()
        self.regions = regions

    def create_local_plan(self) -> dcp_planner.LoadPlan:
        return dcp_planner.LoadPlan([item for key, (offsets, target) in self.regions.items()
                                     for item in create_read_items_for_chunk_list(
                                         key, self.metadata.state_dict_metadata[key],
                                         [dcp_metadata.ChunkStorageMetadata(torch.Size(offsets), target.shape)])])

    def lookup_tensor(self, index: dcp_metadata.MetadataIndex) -> torch.Tensor:
        return self.regions[index.fqn][1]


def stacked_name(name: str) -> tuple[str, int | None]:
    """Megatron's per-layer name -> (the checkpoint's key, the layer's index on its leading axis; None: not stacked)."""
    layer = STACKED_LAYER.fullmatch(name)
    return (f"decoder.layers.{layer[2]}", int(layer[1])) if layer else (name, None)


def model_tensors(metadata: dcp_metadata.Metadata) -> dict[str, tuple[int, ...]]:
    """The model's tensors in a dist checkpoint and their global shapes: not the optimizer's (Megatron-LM) nor
    the non-tensor entries (_extra_state, rng state)."""
    return {key: tuple(md.size) for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, dcp_metadata.TensorStorageMetadata) and not key.startswith("optimizer.")}


def _open(path: Path, spec: ModelSpec, model_cfg, where: str) -> StartingWeights:
    """The weights of the dist checkpoint at `path` checked against the run's model."""
    adapter = spec.state_dict_adapters.get("megatron")
    if adapter is None:
        raise UserError(f"{where}: model family {spec.name} has no Megatron-Core mapping, so it cannot start from a "
                        f"Megatron checkpoint; drop checkpoint.init_from")
    directory = checkpoint_directory(path, where)
    metadata = _read_checkpoint(directory, where)
    if (directory / GPT_CONFIG).is_file():
        problems = adapter.config_problems(read_json_object(directory / GPT_CONFIG, where), model_cfg)
        if problems:
            raise UserError(f"{where} does not fit the run's model: {'; '.join(problems)}")

    # The run's parameters in Megatron's per-layer names (the adapter maps meta tensors: shapes only), and which
    # parameters each of Megatron's tensors fills (a fused one several).
    with torch.device("meta"):
        native = {name: torch.empty(shape) for name, shape in expected_shapes(spec, model_cfg).items()}
        megatron = adapter.from_native(native, model_cfg)
        fills = {name: set(adapter.to_native({name: t}, model_cfg)) for name, t in megatron.items()}
    expected: dict[str, tuple[int, ...]] = {}
    layers: dict[str, int] = defaultdict(int)
    for name, tensor in megatron.items():
        key, layer = stacked_name(name)
        layers[key] = max(layers[key], layer + 1) if layer is not None else 0
        expected[key] = ((layers[key],) if layer is not None else ()) + tuple(tensor.shape)
    found = model_tensors(metadata)
    check_tensors(where, {key: (key, shape) for key, shape in found.items()}, expected)

    def read(wanted: set[str]):
        by_layer: dict[int | None, list[str]] = defaultdict(list)
        for name, filled in fills.items():
            if filled & wanted:
                by_layer[stacked_name(name)[1]].append(name)
        for layer, names in by_layer.items():  # one layer's tensors in memory at a time
            regions = {}
            for name in names:
                key, _ = stacked_name(name)
                shape = expected[key]
                regions[key] = ((layer,) + (0,) * (len(shape) - 1), torch.empty((1,) + shape[1:])) \
                    if layer is not None else ((0,) * len(shape), torch.empty(shape))
            # each rank reads its own layers, no collective
            safe_load({key: target for key, (_, target) in regions.items()}, directory, no_dist=True,
                      planner=_RegionPlanner(regions), fix="copy it again from its source")
            tensors = {name: regions[stacked_name(name)[0]][1].squeeze(0) if layer is not None
                       else regions[name][1] for name in names}
            yield from ((n, t) for n, t in adapter.to_native(tensors, model_cfg).items() if n in wanted)

    return StartingWeights(f"the Megatron-Core weights in {directory} ({len(found)} tensors)",
                           lambda parts: copy_streamed(parts, read))


def _read_checkpoint(directory: Path, where: str) -> dcp_metadata.Metadata:
    """The DCP metadata of the dist checkpoint `directory` (launcher/safe_dcp.py: nothing in it runs), checked to be
    Megatron's torch_dist format."""
    if not (directory / METADATA_JSON).is_file():
        raise UserError(f"{where}: {directory} has no {METADATA_JSON}; is it a Megatron-Core dist checkpoint?")
    backend = read_json_object(directory / METADATA_JSON, where).get("sharded_backend")
    if backend != "torch_dist":
        raise UserError(f"{where}: {directory} is a Megatron checkpoint of backend {backend!r}; only 'torch_dist' is "
                        f"read (convert it with Megatron's dist_checkpointing first)")
    if not (directory / ".metadata").is_file():
        raise UserError(f"{where}: {directory} has no .metadata (DCP's index): the checkpoint is incomplete")
    try:
        return read_metadata(directory)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


MEGATRON_FORMAT = WeightFormat("a Megatron-Core dist checkpoint (metadata.json, .metadata, *.distcp) or a Megatron-LM "
                               "save directory (latest_checkpointed_iteration.txt)", _recognizes, _open)
