"""One rank of a harness world: join the process group, run the checks, record each outcome."""
import datetime
import importlib
import json
import os
import pickle
import sys
import traceback

import torch.distributed as dist

from data.indexed import _megatron_indexed_dataset

# The fork server imports this module (harness._PRELOAD), so megatron.core, which takes seconds of CPU to import,
# is imported once there rather than in every rank that opens an indexed dataset.
_megatron_indexed_dataset()


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec["collective_timeout_s"]))
    results = []
    for target, kwargs in spec["checks"]:
        module, _, function = target.rpartition(":")
        try:
            results.append((True, getattr(importlib.import_module(module), function)(**kwargs)))
        except BaseException:
            results.append((False, traceback.format_exc()))
        with open(out_path + ".tmp", "wb") as f:  # after each check, so a later hang keeps earlier results
            pickle.dump(results, f)
        os.replace(out_path + ".tmp", out_path)
        if not results[-1][0]:
            # The other ranks may be waiting in a collective of the failed check: leave at once so
            # they see the connection drop instead of waiting out their timeout.
            os._exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
