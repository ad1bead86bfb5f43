"""The one exception type for bad user input.

The CLI prints it as a single line ``error: <message>`` and exits non-zero, so every message
names the problem and the fix. Code below the launcher (data/, models/) raises its own
subclass-free errors; the CLI treats ``data.errors.DataError`` the same way.
"""


class UserError(Exception):
    """A problem with the user's config, data, checkpoint or layout, not a bug."""
