"""The one error type the data package raises for bad input."""


class DataError(Exception):
    """Bad or missing data. The message names the problem, the file, and the fix;
    the CLI prints it as one line."""
