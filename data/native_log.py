"""What native decoders (FFmpeg through PyAV, decord) print and raise, kept to one line: their
log lines off stderr while a file is probed or read, their error messages cut to the first
line without source-file prefixes."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Keep decord/ffmpeg's native log lines off stderr (errors are reported as exceptions)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def first_line(err: BaseException) -> str:
    """The first line of an error message, without decord's source-file prefix or PyAV's
    ``[Errno N]`` (200 characters at most)."""
    text = re.sub(r"^\[Errno -?\d+\] ", "", str(err).strip())
    line = text.splitlines()[0] if text else type(err).__name__
    return line.rsplit(": ", 1)[-1][:200] if "/src/" in line else line[:200]
