"""The user's entry: CLI, config, the Trainer loop, checkpoints and metrics."""
from launcher.cpu_threads import set_openmp_defaults

set_openmp_defaults()  # before anything imports torch: libgomp reads its settings once (launcher/cpu_threads.py)
