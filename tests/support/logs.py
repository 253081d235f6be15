"""Reading logs that another process is still writing.

A writer appends a line in one or more ``write`` calls; a reader that looks between two of them
sees a last line without its newline. Such a trailing partial line is not data yet: these
helpers leave it out, so a test never parses half a JSON object (``JSONDecodeError:
Unterminated string``) or counts half a line as a line. A complete line that is not valid JSON
is still an error: that is a real fault of the writer (two lines cut into each other).
"""

from __future__ import annotations

import json
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


__all__ = ["complete_lines", "complete_text", "json_lines"]
