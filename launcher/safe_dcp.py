"""Reading DCP checkpoints without running code from them.

torch's FileSystemReader unpickles `.metadata` with plain `pickle.load`, and its default load planner
reads every non-tensor entry (ints, floats, lists of the optimizer's param groups, the schedule, the
loader position) with `torch.load(weights_only=False)`: a crafted checkpoint runs its payload when
read. Here `.metadata` goes through an unpickler that admits only the classes DCP itself writes into
it, and non-tensor entries through `torch.load(weights_only=True)` (plain Python values and tensors
only). Anything else is refused with one line naming the file or entry.
"""
import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from launcher.errors import UserError

METADATA_FILE = ".metadata"

# What torch's FileSystemWriter pickles into `.metadata` (torch 2.x): its metadata dataclasses, the
# per-entry storage info, tensor sizes, dtypes and layouts, and the path it was saved to; and what Megatron adds.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    # Megatron-Core's dist_checkpointing saver keeps its save plans (plain dataclasses) in the metadata too.
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which DCP metadata never holds")


def read_metadata(checkpoint: Path) -> Metadata:
    """The DCP metadata of `checkpoint`, unpickled with only DCP's own classes; UserError otherwise."""
    path = Path(checkpoint) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"checkpoint {checkpoint} has no {METADATA_FILE} (DCP's index of its shards): it is "
                        f"incomplete; point checkpoints/latest at an earlier step-<N>, or use a new run.dir to "
                        f"start over") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, OSError) as e:  # what a damaged or crafted pickle raises
        raise UserError(f"{path} is not DCP metadata ({type(e).__name__}: {e}); the checkpoint is damaged or was "
                        f"tampered with and is not read: point checkpoints/latest at an earlier step-<N>") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{path} holds a {type(metadata).__name__}, not DCP metadata; the checkpoint is damaged or "
                        f"was tampered with and is not read: point checkpoints/latest at an earlier step-<N>")
    return metadata


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose `.metadata` goes through read_metadata."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor entries with weights_only=True."""

    def __init__(self, checkpoint: Path):
        super().__init__()
        self.checkpoint = checkpoint

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            value = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"checkpoint {self.checkpoint}: entry {fqn} holds more than plain values and tensors "
                            f"({str(e).splitlines()[0]}); it was tampered with and is not read: point "
                            f"checkpoints/latest at an earlier step-<N>") from None
        # The rest of DefaultLoadPlanner.load_bytes, which would read `value` again with weights_only=False.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], value)
        else:
            self.state_dict[fqn] = value


def load(state: dict, checkpoint: Path, no_dist: bool = False, planner: DefaultLoadPlanner | None = None,
         fix: str = "point checkpoints/latest at an earlier step-<N>, or use a new run.dir to start over") -> None:
    """dcp.load of `state` from `checkpoint` through SafeReader and `planner` (SafePlanner by default); a refusal of
    either comes out as its own UserError, any other read failure as a UserError naming the checkpoint, then
    `fix`."""
    try:
        with warnings.catch_warnings():
            # one process reading is what no_dist says: torch's warning that it assumes so is noise in convert's output
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(state, storage_reader=SafeReader(checkpoint), planner=planner or SafePlanner(checkpoint),
                     no_dist=no_dist)
    except UserError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException (a BaseException) wraps every rank's error
        failures = [exc for exc, _trace in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        for failure in failures:
            if isinstance(failure, UserError):
                raise failure from None
        first = failures[0] if failures else e
        raise UserError(f"checkpoint {checkpoint} could not be read ({type(first).__name__}: "
                        f"{(str(first).splitlines() or [''])[0]}); it is damaged: {fix}") from None
