"""What ``l4lb check`` (and ``l4lb run``) report about a file: each problem with its key path,
file line and severity, and the one exception that carries them."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["ConfigError", "ConfigIssue", "Severity"]


class Severity(enum.StrEnum):
    """An error refuses the file (exit 1); a warning or a note is printed and the file is used."""

    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"
    """Something that could not be checked from here (said, never counted against the file)."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem: the key path (``listeners[0].bind``, empty for the whole file) and a message.

    ``line`` is where the key (or its table) is in the file, when it could be found.
    """

    path: str
    message: str
    line: int | None = None
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return text if self.line is None else f"{text} (line {self.line})"


class ConfigError(Exception):
    """The configuration is invalid; ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        n = len(issues)
        lines = [f"{source}: {n} error{'s' if n != 1 else ''}"]
        lines += [f"  {issue}" for issue in issues]
        super().__init__("\n".join(lines))
