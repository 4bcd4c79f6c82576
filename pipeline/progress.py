"""Progress bars that work under ``distributed`` (``dask.diagnostics.ProgressBar``
prints nothing there): futures are counted as they complete and shown with rich on
stderr."""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(description: str) -> Progress:
    """A rich progress bar on stderr; quiet when stderr is not a terminal."""
    from rich.console import Console

    console = Console(file=sys.stderr)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def wait_with_progress(futures: Iterable[Any], description: str) -> list[Any]:
    """Wait for ``distributed`` futures, advancing a bar as each finishes.

    Returns the results in the order of ``futures``; the first failure is raised.
    """
    from distributed import as_completed

    futures = list(futures)
    with progress_bar(description) as bar:
        task = bar.add_task(description, total=len(futures))
        for _ in as_completed(futures):
            bar.advance(task)
    return [future.result() for future in futures]


def compute_with_progress(collection: Any, description: str) -> Any:
    """Compute a Dask collection on the current client with a progress bar."""
    from distributed import default_client, futures_of

    client = default_client()
    persisted = client.persist(collection)
    wait_with_progress(futures_of(persisted), description)
    return client.compute(persisted).result()


class StageClock:
    """Wall-clock seconds of consecutive stages of a command, reported in its result:
    ``lap(name)`` ends a stage; ``laps`` maps each name to its seconds."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._start, 3)
        self._start = now
