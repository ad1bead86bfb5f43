"""CPU runs: keep torch's idle OpenMP threads spinning between ops, even once another thread has run a parallel op.

torch's CPU kernels run on a GNU OpenMP (libgomp) team. Between two ops its idle threads spin (300000 iterations)
before they sleep, so that the next op starts at once. libgomp cuts that spin to 100 iterations while the process
holds more OpenMP threads than CPUs, and a second team keeps it there for the rest of the run: the first time
another thread runs a parallel op it gets a team of its own, e.g. a gloo worker copying the result of a large
collective (a DCP save gathers its plans through one). From then on the team sleeps between most ops and each op pays
to wake it: on a 2-core machine the tiny config at dim 256 trained 15-20% slower after its first checkpoint, sync or
async, its small element-wise ops twice as slow (docs/performance.md). OMP_WAIT_POLICY=ACTIVE raises the cut-down
spin to 1000 iterations, and GOMP_SPINCOUNT=300000 keeps the usual one (ACTIVE alone would keep idle threads
spinning, on their cores, for minutes). libgomp reads both once, when torch loads it, so the launcher package sets
them, where the user has not, before anything imports torch (launcher/__init__.py); the processes it starts inherit
them.
"""
import os
import sys

SETTINGS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}
_libgomp_saw: dict[str, str | None] = {}  # the settings this process's libgomp read (or will read) at load


def set_openmp_defaults() -> None:
    """Put SETTINGS into the environment where unset: for this process's libgomp unless torch is loaded already,
    and for every process it starts either way."""
    before = {name: os.environ.get(name) for name in SETTINGS}
    for name, value in SETTINGS.items():
        os.environ.setdefault(name, value)
    _libgomp_saw.update(before if "torch" in sys.modules else {name: os.environ[name] for name in SETTINGS})


def describe_openmp(n_threads: int) -> str | None:
    """A line for the log of a CPU run with `n_threads` torch threads: whether its idle OpenMP threads keep spinning,
    and if not the fix. None for one thread: no team to wake, and other threads' ops then run single-threaded too."""
    if n_threads <= 1:
        return None
    saw = " ".join(f"{name}={_libgomp_saw.get(name) or '(unset)'}" for name in SETTINGS)
    if all(_libgomp_saw.get(name) == value for name, value in SETTINGS.items()):
        return f"OpenMP: {saw}: idle threads keep spinning between ops once other threads run parallel ops too"
    return (f"OpenMP: this process's libgomp started with {saw}, so once another thread runs a parallel op (a "
            f"checkpoint's collectives do) torch's threads sleep between ops and CPU training slows (15-20% on 2 cores: "
            f"docs/performance.md); start it with " + " ".join(f"{k}={v}" for k, v in SETTINGS.items()))
