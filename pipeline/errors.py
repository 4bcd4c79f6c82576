"""Exceptions that carry a message meant for the user (printed as one ``ERROR:`` line), and
the grouping that keeps a run of like problems to one line, and the check of seeds."""

from __future__ import annotations

import operator
from typing import Callable, Hashable, Iterable, TypeVar

Item = TypeVar("Item")


class AirysortError(Exception):
    """A problem with the user's input or store; the message says what and how to fix it."""


class StoreLockedError(AirysortError):
    """Another airysort process is writing to the store."""


def check_seed(seed, option: str = "--seed") -> int:
    """``seed`` as an int, or an AirysortError unless it is an integer from 0 to 2**32 - 1
    (what NumPy's generators and scikit-learn accept)."""
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if isinstance(seed, bool) or value is None or not 0 <= value < 2**32:
        raise AirysortError(f"{option} {seed!r} must be an integer from 0 to 2**32 - 1")
    return value


def consecutive_runs(
    items: Iterable[Item], *, key: Callable[[Item], Hashable], number: Callable[[Item], int | None]
) -> list[list[Item]]:
    """Split ``items`` into runs of neighbours that share ``key`` and whose ``number`` (a
    frame, a line of a file) rises by one; an item numbered None stands alone.

    A file from another detector has every frame rejected for one reason, a label sheet
    200 rows of which were never filled in: the user reads one line for each run.
    """
    runs: list[list[Item]] = []
    for item in items:
        if runs:
            last = runs[-1][-1]
            before, this = number(last), number(item)
            if before is not None and this is not None and this == before + 1 and key(last) == key(item):
                runs[-1].append(item)
                continue
        runs.append([item])
    return runs
