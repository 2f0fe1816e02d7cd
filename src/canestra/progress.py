"""Per-stage progress lines on stderr: what runs, how long it took, what it made."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class _Stage:
    def __init__(self, name: str):
        self.name = name
        self.notes: list[str] = []
        self.seconds = 0.0

    def note(self, text: str) -> None:
        self.notes.append(text)


class Progress:
    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str):
        st = _Stage(name)
        self.say(f"canestra ▸ {name} …")
        t0 = time.perf_counter()
        try:
            yield st
        finally:
            st.seconds = time.perf_counter() - t0
        detail = f": {'; '.join(st.notes)}" if st.notes else ""
        self.say(f"canestra ✓ {name} {st.seconds:.1f}s{detail}")
