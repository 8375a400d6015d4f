"""User-actionable errors: the CLI prints the message on one line and exits non-zero."""


class BamError(Exception):
    """An error the user can fix; its message says what was wrong and what to do instead."""

    exit_code = 2
