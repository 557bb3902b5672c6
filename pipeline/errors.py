"""User-facing errors: one readable message, exit code 2, no traceback (``--debug`` shows one)."""


class GradpipeError(Exception):
    """A problem the user can fix: bad input, a bad setting, a missing path.

    The message names the file/row/column or the setting to change; the CLI prints it and exits 2.
    """

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C (or SIGTERM) while a run stops: leave at once, saying how to continue."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
