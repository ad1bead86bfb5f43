"""`shardwright train ...`, SIGKILLed at a chosen moment of the checkpoint save at step KILL_STEP.

    python -m tests.e2e.crash_during_save POINT KILL_STEP train CONFIG --set ...

POINT: mid-write (a shard half written), before-publish (all shards written, not renamed),
before-latest (renamed to step-N, `latest` not yet moved).
"""
import os
import signal
import sys

import torch.distributed.checkpoint as dcp

import launcher.checkpoint as checkpoint
from launcher.cli import main


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def patch(point: str, kill_step: int) -> None:
    real_save, real_write = dcp.save, checkpoint._write_atomically

    def save(state, checkpoint_id, **options):
        if checkpoint_id.name != f".staging-step-{kill_step}":
            return real_save(state, checkpoint_id=checkpoint_id, **options)
        if point == "mid-write":
            (checkpoint_id / "__0_0.distcp").write_bytes(b"\0" * 1000)
            die()
        real_save(state, checkpoint_id=checkpoint_id, **options)
        if point == "before-publish":
            die()

    def write_atomically(path, text):
        if point == "before-latest" and path.name == "latest" and text == f"step-{kill_step}":
            die()
        real_write(path, text)

    dcp.save = save
    checkpoint._write_atomically = write_atomically


if __name__ == "__main__":
    patch(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
