"""Progress bars that work under ``distributed`` (``dask.diagnostics.ProgressBar``
prints nothing there): futures are counted as they complete and shown with rich on
stderr; where stderr is not a terminal (a batch job's log file), as plain lines instead."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(description: str) -> Progress | LogProgress:
    """A rich progress bar on stderr, or :class:`LogProgress` lines when stderr is not a
    terminal (a bar's redrawing would fill a log file; silence would leave a batch job
    without news for the whole stage). Each task names the unit it counts, in both:
    ``add_task(description, total=n, unit="shards")``."""
    from rich.console import Console

    console = Console(file=sys.stderr)
    if not console.is_terminal:
        return LogProgress()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class LogProgress:
    """The part of rich's ``Progress`` the commands use, as plain lines on stderr: one when
    a task starts, then at most one per ``interval`` seconds, and one when it completes."""

    def __init__(self, interval: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, *, unit: str, **_: Any) -> int:
        task = len(self._tasks)
        now = self.clock()
        self._tasks[task] = {"description": description, "total": total, "unit": unit, "done": 0.0, "start": now,
                             "said": now}
        self._say(task, now)
        return task

    def advance(self, task: int, advance: float = 1.0) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, advance: float = 0.0, completed: float | None = None, **_: Any) -> None:
        state = self._tasks[task]
        state["done"] = completed if completed is not None else state["done"] + advance
        now = self.clock()
        finished = state["total"] is not None and state["done"] >= state["total"]
        if finished or now - state["said"] >= self.interval:
            self._say(task, now)

    def _say(self, task: int, now: float) -> None:
        state = self._tasks[task]
        state["said"] = now
        elapsed = now - state["start"]
        total, done = state["total"], state["done"]
        line = f"{state['description']}: {done:g}" + (f"/{total:g}" if total is not None else "")
        line += f" {state['unit']}, {elapsed:.0f} s"
        if total and 0 < done < total:
            line += f", about {elapsed * (total - done) / done:.0f} s left"
        print(line, file=sys.stderr, flush=True)


def wait_with_progress(futures: Iterable[Any], description: str, *, unit: str = "tasks") -> list[Any]:
    """Wait for ``distributed`` futures, advancing a bar as each finishes (``unit``: what
    one future is, e.g. "shards").

    Returns the results in the order of ``futures``; the first failure is raised.
    """
    from distributed import as_completed

    futures = list(futures)
    with progress_bar(description) as bar:
        task = bar.add_task(description, total=len(futures), unit=unit)
        for _ in as_completed(futures):
            bar.advance(task)
    return [future.result() for future in futures]


def compute_with_progress(collection: Any, description: str, *, unit: str = "chunks") -> Any:
    """Compute a Dask collection on the current client with a progress bar that counts
    its parallel tasks (one per chunk; for the writes of ``to_zarr(compute=False)`` one per
    shard written, not the single task that finalises them), each one ``unit``."""
    import dask
    from distributed import default_client

    client = default_client()
    # Optimised once (fusing each shard's read into the task that uses it), and both
    # submissions below use this same graph: a key must not come with two definitions.
    (collection,) = dask.optimize(collection)
    graph = dict(collection.__dask_graph__())
    futures = client.get(graph, parallel_keys(graph, collection.__dask_keys__()), sync=False)
    wait_with_progress(futures, description, unit=unit)
    # The finished keys are reused by the scheduler: this only runs what follows them.
    return client.compute(collection, optimize_graph=False).result()


def parallel_keys(graph: dict, keys: Any) -> list:
    """The tasks a computation of ``keys`` fans out to: below the chain of single tasks
    that finalise a result (e.g. a store's finalize → one task per chunk written), and
    below a write that gathers many blocks into one long shard, those blocks
    (:func:`_gathered_blocks`)."""
    from dask.core import flatten, get_dependencies

    frontier = list(flatten(keys))
    while True:
        # One finalising task, or one per variable written (``finalize-…``): go below them.
        single = len(frontier) == 1
        finalising = all(_name(key).startswith("finalize") for key in frontier)
        if not (single or finalising):
            break
        below = set().union(*(get_dependencies(graph, key) for key in frontier))
        if not below:
            break
        frontier = sorted(below, key=str)
    return [piece for key in frontier for piece in _gathered_blocks(graph, key)]


def _name(key: Any) -> str:
    return str(key[0] if isinstance(key, tuple) else key)


def _gathered_blocks(graph: dict, key: Any) -> list:
    """The blocks that the task ``key`` concatenates, below its chain of single
    dependencies (a write of a 65,536-pattern shard of ``prob`` waits for 256 blocks of
    ``predict``: a bar counting shard writes would stand still for most of the stage), or
    ``[key]`` when it concatenates nothing (a write of one block). A concatenation is a
    ``rechunk-merge`` task or one that depends on several blocks of one array (a block
    computed from several inputs depends on keys of different names)."""
    from dask.core import get_dependencies

    below, task = [key], key
    while len(below) == 1:
        task = below[0]
        below = sorted(get_dependencies(graph, task), key=str)
    if len(below) > 1 and ("rechunk-merge" in _name(task) or len({_name(block) for block in below}) == 1):
        return below
    return [key]


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
