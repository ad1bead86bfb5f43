"""`python -m launcher.torchrun TORCHRUN_ARGS`: torchrun (torch.distributed.run's elastic agent, unchanged)
as the child of `shardwright train --nproc-per-node`, with the world's outcome as an exit code and at
most one line instead of torchrun's tracebacks.

    0   the world finished
    75  it stopped after a stop signal (SIGTERM/SIGUSR1 forwarded by the launcher, or one sent to the
        workers), each rank having checkpointed: run the same command to resume
    2   the workers refused their input: rank 0 printed the `error:` line, or, when another rank alone refused,
        this process prints that rank's line from its error file (refused_line)
    1   a worker failed (after run.max_restarts restarts): one line names it; its output is above
"""
import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args, run

from launcher.errors import PREEMPTED_EXIT, USER_ERROR_EXIT, UserError
from launcher.processes import AGENT_PID_ENV, LAUNCHER_PID_ENV, die_with_parent


def world_exit_code(failures: dict[int, ProcessFailure], max_restarts: int) -> int:
    """The exit code of a world whose ranks failed as `failures` say, from the first failure: once one rank
    exits, torchrun stops the others (they are recorded as killed by SIGTERM). One line unless a rank said it."""
    rank = min(failures, key=lambda r: failures[r].timestamp)
    failure = failures[rank]
    if failure.exitcode == PREEMPTED_EXIT:  # every rank stopped after the same step; rank 0 logged it
        return PREEMPTED_EXIT
    if failure.exitcode == USER_ERROR_EXIT:
        if (line := refused_line(failures)) is not None:
            print(line, file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}"
    print(f"error: rank {rank} (pid {failure.pid}) {how}"
          f"{f' after {max_restarts} restart(s) of the world' if max_restarts else ''}; its output is above; "
          f"run the same command to resume from the last checkpoint (run.max_restarts restarts a world automatically)",
          file=sys.stderr, flush=True)
    return 1


def refused_line(failures: dict[int, ProcessFailure]) -> str | None:
    """The `error:` line of a world whose workers refused their input, for this process to print: None when rank 0
    refused too (it printed the line, launcher/cli.py), else the refusal of the first other rank that did, which
    that rank recorded in its torchelastic error file instead of printing (so that a refusal every rank raises is
    said once), or a line saying it left none."""
    refused = sorted((f.timestamp, rank) for rank, f in failures.items() if f.exitcode == USER_ERROR_EXIT)
    if not refused or any(rank == 0 for _, rank in refused):
        return None
    rank = refused[0][1]
    message = failures[rank].message
    message = message.get("message") if isinstance(message, dict) else None
    if not message:
        return f"error: rank {rank} refused its input without saying why (no error file); its output is above"
    return f"error: {message.split(': ', 1)[-1]} (rank {rank})"


def quiet_agent_warnings() -> None:
    """The agent's warnings ("Received 15 death signal", "Sending process N closing signal") would bury the line
    that says how the world ended; rank 0 logs its stop, and a restarted world logs its resume. torch gives each
    elastic module's logger a level of its own, so the parent's level alone does not reach them."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str]) -> int:
    try:  # the launcher's death stops this world as a stop signal does: workers checkpoint, then exit
        die_with_parent(signal.SIGTERM, int(os.environ[LAUNCHER_PID_ENV]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    os.environ[AGENT_PID_ENV] = str(os.getpid())  # the workers die with this process (launcher/cli.py)
    quiet_agent_warnings()
    args = parse_args(argv)
    try:
        run(args)
    except SignalException:  # torchrun sent the signal to the workers, which checkpoint and stop
        return PREEMPTED_EXIT
    except ChildFailedError as e:
        return world_exit_code(e.failures, args.max_restarts)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
