"""User-facing errors: one readable message, exit code 2, no traceback (``--debug`` shows one)."""


class GradpipeError(Exception):
    """A problem the user can fix: bad input, a bad setting, a missing path.

    The message names the file/row/column or the setting to change; the CLI prints it and exits 2.
    """

    exit_code = 2
