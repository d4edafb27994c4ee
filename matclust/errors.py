"""Exceptions that map onto the command-line exit codes.

``InputError`` is everything the user can fix (bad file, bad option, bad data): the CLI turns it
into one ``error:`` line on stderr and exit code 2. Anything else is a bug or an environment
failure and exits 1.
"""


class InputError(ValueError):
    """Bad usage or bad input; the message names the file, dataset and matrix index."""


class MissingExtraError(InputError):
    """An optional dependency (an extra) is needed for the requested feature."""

    def __init__(self, package: str, extra: str, feature: str):
        super().__init__(
            f"{feature} needs the optional package '{package}': "
            f"pip install 'matclust[{extra}]'"
        )


class WriteFailure(Exception):
    """A file could not be written for a reason outside the user's input (a full disk, a
    file-size limit): one ``error:`` line and exit code 1. The message says what was kept."""
