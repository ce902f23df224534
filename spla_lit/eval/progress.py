"""A progress bar for ``eval.py``: one bar over the whole evaluation, in tokens, with the current (task,
length) and the time remaining."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator


class EvalProgress:
    """Counts evaluated tokens out of ``total``; :meth:`stage` names the current part (``niah_single @ 1024``).

    Inside :meth:`live`, a rich bar (on a terminal) shows the count, the stage and the ETA, and the log lines
    of the console handlers print above it instead of through it. Disabled (``enabled=False``), every method
    does nothing, so the evaluation code calls it unconditionally.
    """

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self._progress = None
        self._task = None

    @contextlib.contextmanager
    def live(self) -> Iterator[EvalProgress]:
        if not self.enabled:
            yield self
            return
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        before = (sys.stdout, sys.stderr)
        self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), TaskProgressColumn(),
                                  TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"), TimeElapsedColumn(),
                                  TextColumn("ETA"), TimeRemainingColumn())
        with self._progress:
            # rich now routes sys.stdout/err above the bar; point the logging handlers that wrote to the old
            # streams at the routed ones for the duration (the log lines would otherwise cut through the bar)
            swapped = []
            for handler in logging.getLogger().handlers:
                old = handler.stream if type(handler) is logging.StreamHandler else None
                new = sys.stdout if old is before[0] else sys.stderr if old is before[1] else old
                if new is not old:
                    handler.setStream(new)
                    swapped.append((handler, old))
            self._task = self._progress.add_task("evaluating", total=self.total)
            try:
                yield self
            finally:
                for handler, stream in swapped:
                    handler.setStream(stream)
                self._progress, self._task = None, None

    def stage(self, description: str) -> None:
        """Name the part being evaluated."""
        if self._progress is not None:
            self._progress.update(self._task, description=description)

    def advance(self, tokens: int) -> None:
        """``tokens`` more were evaluated."""
        if self._progress is not None:
            self._progress.update(self._task, advance=tokens)
