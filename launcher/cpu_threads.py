"""CPU runs: keep torch's idle OpenMP threads spinning between ops, even once another thread has run a parallel op.

torch's CPU kernels run on a GNU OpenMP (libgomp) team. Between two ops its idle threads spin (300000 iterations)
before they sleep, so that the next op starts at once. libgomp cuts that spin to 100 iterations while the process
holds more OpenMP threads than CPUs, and a second team keeps it there for the rest of the run: the first time
another thread runs a parallel op it gets a team of its own, e.g. a gloo worker copying the result of a large
collective (a DCP save gathers its plans through one). From then on the team sleeps between most ops and each op pays
to wake it: on a 2-core machine the tiny config at dim 256 trained 10-20% slower after its first checkpoint, sync or
async, its small element-wise ops twice as slow (docs/performance.md). OMP_WAIT_POLICY=ACTIVE raises the cut-down
spin to 1000 iterations, and GOMP_SPINCOUNT=300000 keeps the usual one (libgomp's default but on Intel's hybrid
CPUs; ACTIVE alone would keep idle threads spinning, on their cores, for minutes). libgomp reads both once, when
torch loads it, so the launcher package sets them, where the user has set neither and torch bundles libgomp, before
anything imports torch (launcher/__init__.py); the processes it starts inherit them.
"""
import importlib.util
import os
import sys
from pathlib import Path

SETTINGS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}
# What this process's libgomp read (or will read) when torch loads it; empty when torch does not bundle libgomp.
_libgomp_saw: dict[str, str | None] = {}


def torch_bundles_libgomp() -> bool:
    """Whether the torch this Python imports ships GNU OpenMP (pip's Linux wheels do; a build on LLVM's or Intel's
    OpenMP does not, and there OMP_WAIT_POLICY=ACTIVE alone means threads that never sleep). Looked up without
    importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    package = Path(spec.origin).parent
    return any(path for folder in (package / "lib", package.with_name("torch.libs"))
               for path in folder.glob("libgomp*.so*"))


def set_openmp_defaults() -> None:
    """Put SETTINGS into the environment where the user has set neither (a choice of either is kept whole: in libgomp
    an explicit spin count overrides the wait policy's), for torch's own libgomp only: for this process's unless torch
    is loaded already, and for the processes it starts either way."""
    if not torch_bundles_libgomp():
        return
    before = {name: os.environ.get(name) for name in SETTINGS}
    if all(value is None for value in before.values()):
        os.environ.update(SETTINGS)
    _libgomp_saw.update(before if "torch" in sys.modules else {name: os.environ.get(name) for name in SETTINGS})


def describe_openmp(n_threads: int) -> str | None:
    """A line for the log of a CPU run with `n_threads` torch threads: what its libgomp started with and, unless idle
    threads keep spinning, the fix. None for one thread (no team to wake, and other threads' ops then run on one
    thread too) and for a torch without libgomp."""
    if n_threads <= 1 or not _libgomp_saw:
        return None
    saw = " ".join(f"{name}={_libgomp_saw.get(name) or '(unset)'}" for name in SETTINGS)
    if (_libgomp_saw.get("OMP_WAIT_POLICY") or "").strip().lower() == "active":
        return f"OpenMP: libgomp started with {saw}: idle threads keep spinning between ops"
    return (f"OpenMP: libgomp started with {saw}: once another thread has run a parallel op (a checkpoint's "
            f"collectives do), torch's threads sleep between ops and CPU training slows (10-20% on 2 cores: "
            f"docs/performance.md); start with " + " ".join(f"{k}={v}" for k, v in SETTINGS.items()))
