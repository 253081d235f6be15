"""Reading logs that another process is still writing.

A writer appends a line in one or more ``write`` calls; a reader that looks between two of them
sees a last line without its newline. Such a trailing partial line is not data yet: these
helpers leave it out, so a test never parses half a JSON object (``JSONDecodeError:
Unterminated string``) or counts half a line as a line. A complete line that is not valid JSON
is still an error: that is a real fault of the writer (two lines cut into each other).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def complete_lines(path: str | Path) -> list[str]:
    """The lines of ``path`` that end with a newline (none if the file does not exist yet)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n")
    return data[: end + 1].decode("utf-8", "replace").splitlines() if end >= 0 else []


def complete_text(path: str | Path) -> str:
    """The text of ``path`` up to and including its last newline."""
    lines = complete_lines(path)
    return "".join(line + "\n" for line in lines)


def json_lines(path: str | Path) -> list[dict[str, Any]]:
    """Every complete, non-blank line of a JSON-lines log, parsed."""
    return [json.loads(line) for line in complete_lines(path) if line.strip()]


def wait_line(path: str | Path, needle: str, count: int = 1, timeout: float = 10.0) -> str:
    """Wait until ``needle`` stands ``count`` times or more in the complete lines of ``path``.

    For a log a thread writes (l4lb's stderr): the line about an event may come a moment after
    the event itself. Returns the complete text; raises AssertionError naming the line and
    showing the log's tail when it does not come within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = complete_text(path)
        if text.count(needle) >= count:
            return text
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{needle!r} not {count} time(s) in {path} after {timeout}s "
                f"(seen {text.count(needle)}):\n{text[-3000:]}"
            )
        time.sleep(0.02)


__all__ = ["complete_lines", "complete_text", "json_lines", "wait_line"]
