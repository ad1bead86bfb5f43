"""CPU runs: stop glibc from returning a step's large freed blocks to the OS, only to page-fault
them back in on the next step.

glibc serves each allocation above a threshold (128 KiB, raised dynamically) with its own mmap
and unmaps it on free, and trims the heap top above 128 KiB of free space. A training step
allocates and frees the same large activations and gradients every time, so without tuning each
step pays the page faults of touching that memory afresh, by how much depending on how the
process's allocation history set the dynamic threshold — so two runs of the same model differed by
5% (benchmarks/overhead.py found it: the default tiny config, one thread, before vs after this
tuning: bare loop 6781 -> 7084 tokens/s, trainer 6412 -> 7113). Serving blocks
up to 64 MiB from the heap and keeping up to 1 GiB of freed heap removes that cost; the price is
that the process keeps its peak heap size. CUDA memory has its own caching allocator.
"""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> str:
    """Tune glibc's malloc for repeated large allocations (see above); returns a line for the log
    saying what was done, or why nothing was."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return f"CPU allocator left as is: no glibc mallopt in this C library ({name})"
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "CPU allocator left as is: glibc refused the mallopt settings"
    return (f"CPU allocator: blocks up to {MMAP_THRESHOLD >> 20} MiB from the heap, freed memory kept up to "
            f"{TRIM_THRESHOLD >> 30} GiB (no page faults for each step's activations)")
