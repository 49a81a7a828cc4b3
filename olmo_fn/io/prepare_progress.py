"""What `prepare-data` shows while it runs: a rich bar on a terminal, a few plain lines otherwise.

Everything goes to stderr, and nothing at all when disabled.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn


class PrepareProgress:
    """Progress over the input bytes of the files to write, with documents/s and tokens/s.

    Use as a context manager around the work; `start` and `finish` print the plain lines.
    """

    def __init__(self, *, enabled: bool, total_bytes: int, files: int):
        self.enabled, self.total_bytes, self.files = enabled, total_bytes, files
        self.console = Console(stderr=True, highlight=False, emoji=False)
        self.documents = self.tokens = self.files_done = 0
        self._bar: Progress | None = None
        self._t0 = time.perf_counter()

    def start(self, settings: str) -> None:
        if self.enabled:
            self._line(settings)

    def __enter__(self) -> PrepareProgress:
        self._t0 = time.perf_counter()
        if self.enabled and self.console.is_terminal and self.files:
            self._bar = Progress(
                TextColumn("[bold]prepare"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("prepare", total=self.total_bytes, stats=self._stats())
        return self

    def advance(self, documents: int, tokens: int, input_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(self._task, advance=input_bytes, stats=self._stats())

    def file_done(self) -> None:
        self.files_done += 1
        if self._bar is not None:
            self._bar.update(self._task, stats=self._stats())

    def _stats(self) -> str:
        seconds = max(time.perf_counter() - self._t0, 1e-9)
        docs, tokens = self.documents, self.tokens
        return (
            f"{self.files_done}/{self.files} files  {_short(docs)} docs {_short(docs / seconds)}/s  "
            f"{_short(tokens)} tokens {_short(tokens / seconds)}/s"
        )

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)  # type: ignore[arg-type]

    def finish(self, summary: dict[str, Any]) -> None:
        """The closing lines: what was written, how fast, and the first malformed lines."""
        if not self.enabled:
            return
        s = summary
        self._line(
            f"prepare-data: wrote {s['files_written']} files, skipped {s['files_skipped']} already done; "
            f"{s['documents']:,} documents, {s['tokens']:,} tokens in {s['seconds']:.1f} s "
            f"({s['documents_per_s']:,.0f} docs/s, {s['tokens_per_s']:,.0f} tokens/s)"
        )
        if s["malformed_lines"]:
            self._line(f"prepare-data: skipped {s['malformed_lines']} malformed lines:")
            for example in s["malformed_examples"]:
                self._line(f"  {example}")
            if s["malformed_lines"] > len(s["malformed_examples"]):
                more = s["malformed_lines"] - len(s["malformed_examples"])
                self._line(f"  ... and {more} more")

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)


def _short(count: float) -> str:
    """`count` in at most four significant characters: 950, 12.3k, 4.1M, 2.0G."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return f"{count:.0f}"
