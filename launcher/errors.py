"""The one exception type for bad user input.

The CLI prints it as a single line ``error: <message>`` and exits non-zero, so every message
names the problem and the fix. Code below the launcher (data/, models/) raises its own
subclass-free errors; the CLI treats ``data.errors.DataError`` the same way.
"""


class UserError(Exception):
    """A problem with the user's config, data, checkpoint or layout, not a bug."""


# Exit codes of `shardwright` (docs/reliability.md).
USER_ERROR_EXIT = 2  # bad input: one line `error: ...`
# After SIGUSR1/SIGTERM (Slurm's time-limit warning, preemption): the last finished step is
# checkpointed, and the job script requeues itself to resume from it (EX_TEMPFAIL).
PREEMPTED_EXIT = 75
