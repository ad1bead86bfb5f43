"""`shardwright train ...`, SIGKILLed at a chosen moment of the checkpoint save at step KILL_STEP.

    python -m tests.e2e.crash_during_save POINT KILL_STEP train CONFIG --set ...

POINT: mid-write (a shard half written), before-publish (all shards written, not renamed),
before-latest (renamed to step-N, `latest` not yet moved). With checkpoint.async_save=true the training process
is killed for the first as soon as the save call returns, while DCP's writer process holds the write of step 3
(tests/e2e/held_writer.py: a patch of the writer would not reach that process), after writing the writer
process's pid and the time into killed-mid-write.json beside the run directory; the others happen when the main
thread publishes.
"""
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import launcher.checkpoint as checkpoint
from launcher.cli import main
from tests.e2e.held_writer import HeldBackgroundWriter


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def patch(point: str, kill_step: int) -> None:
    staging_name = f".staging-step-{kill_step}"
    real_write_data, real_publish = checkpoint._ErrnoKeepingWriter.write_data, checkpoint.Checkpointer._publish
    real_save = checkpoint.Checkpointer.save
    real_write = checkpoint._write_atomically

    def write_data(writer, plan, planner):
        if point == "mid-write" and Path(writer.path).name == staging_name:
            (Path(writer.path) / "__0_0.distcp").write_bytes(b"\0" * 1000)
            die()
        return real_write_data(writer, plan, planner)

    def save(checkpointer, step, *args):
        published = real_save(checkpointer, step, *args)
        if point == "mid-write" and checkpointer.async_save and step == kill_step:
            killed = {"writer_pids": [child.pid for child in multiprocessing.active_children()], "at": time.time()}
            (checkpointer.root.parent.parent / "killed-mid-write.json").write_text(json.dumps(killed))
            die()
        return published

    def publish(checkpointer, step, meta, staging, share):
        if point == "before-publish" and staging.name == staging_name:
            die()
        return real_publish(checkpointer, step, meta, staging, share)

    def write_atomically(path, text):
        if point == "before-latest" and path.name == "latest" and text == f"step-{kill_step}":
            die()
        real_write(path, text)

    checkpoint._ErrnoKeepingWriter.write_data = write_data
    if point == "mid-write":
        checkpoint._BackgroundWriter = HeldBackgroundWriter
    checkpoint.Checkpointer.save = save
    checkpoint.Checkpointer._publish = publish
    checkpoint._write_atomically = write_atomically


if __name__ == "__main__":
    patch(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
