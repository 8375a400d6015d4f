"""User-actionable errors: the CLI prints the message on one line and exits non-zero."""

from __future__ import annotations

from typing import Any


class BamError(Exception):
    """An error the user can fix; its message says what was wrong and what to do instead."""

    exit_code = 2


class ConfigError(BamError):
    """An invalid configuration value. ``key`` is relative where it is raised (``batch_size``);
    the config boundary adds the section (``train.batch_size``) with :meth:`under`."""

    def __init__(self, key: str, value: Any, problem: str) -> None:
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"invalid {key}={value!r}: {problem}")

    def under(self, section: str) -> "ConfigError":
        """The same error with its key inside ``section``."""
        return ConfigError(f"{section}.{self.key}" if section else self.key, self.value, self.problem)


class Stopped(BamError):
    """The command was stopped by a signal; exits with 128 + its number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
