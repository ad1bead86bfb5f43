"""Live tensor bytes, counted at the dispatcher: every storage an op creates is added when it appears and
subtracted when it is freed (a weak reference to the storage's Python object, which torch keeps as long as the
storage lives). The same counter measures real CPU runs (benchmarks/plan_memory.py) and sizes activations of a
model on the meta device (planner/probe.py), where storages have sizes but no data."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages created while the mode is active (and of any added with `add`), and their peak."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, weakref.ref] = {}
        self.now = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(tensor):  # a DTensor: its local tensor holds the bytes
            for name in tensor.__tensor_flatten__()[0]:
                inner = getattr(tensor, name)
                if isinstance(inner, torch.Tensor):
                    self.add(inner)
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.storages or not storage.nbytes():
            return
        size = storage.nbytes()
        self.now += size
        self.peak = max(self.peak, self.now)

        def freed(_, key=key, size=size):
            self.storages.pop(key, None)
            self.now -= size

        self.storages[key] = weakref.ref(storage, freed)

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.add(value)
        return out
