"""The label CSV of interface.md, read one way for ``airysort label`` and ``evaluate --truth``.

A header ``shot_id,`` followed by the 11 class names (any order, the ``shot_id`` header in
any case), then one row of 0/1 values per pattern. What a researcher's sheet often holds
is handled, never silently: a byte-order mark (Excel), spaces around fields, ``1.0`` for 1
(pandas writes float columns so), blank lines, the header repeated where sheets were
joined with ``cat``, extra columns (reported and ignored). A row that cannot be used (a
wrong number of fields, a value other than 0 or 1, classes the taxonomy excludes, a
shot id listed again) is kept with the reason, so that callers report it by line number.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import AirysortError, consecutive_runs
from pipeline.taxonomy import CLASS_NAMES, N_CLASSES, label_cell_value, label_row_problem


@dataclass(frozen=True)
class LabelRow:
    """One data row of a label CSV."""

    #: Line number in the file (the header is line 1).
    line: int
    shot_id: str
    #: int8 0/1 per class in taxonomy order; None when the row cannot be used.
    values: np.ndarray | None
    #: Why the row cannot be used; None when it can.
    problem: str | None


@dataclass
class LabelSheet:
    """A parsed label CSV: its data rows, and notes on the rest (ignored columns, headers
    repeated where sheets were joined), as ``(line or None, text)``."""

    rows: list[LabelRow] = field(default_factory=list)
    notes: list[tuple[int | None, str]] = field(default_factory=list)


def read_label_csv(path: str | Path) -> LabelSheet:
    """Read a label CSV; one :class:`AirysortError` line when it cannot be read at all
    (missing, empty, a header without ``shot_id`` first or without every class)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a CSV file" if path.is_dir() else "does not exist"
        raise AirysortError(f"label file {str(path)!r} {what}")
    sheet = LabelSheet()
    with open(path, newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise AirysortError(f"label file {str(path)!r} is empty")
        if header[0].strip().lower() != "shot_id":
            raise AirysortError(
                f"{str(path)!r} must start with a header 'shot_id,{','.join(CLASS_NAMES)}', got {header!r}"
            )
        columns = [name.strip() for name in header[1:]]
        repeated = sorted({name for name in columns if columns.count(name) > 1})
        if repeated:
            raise AirysortError(f"{str(path)!r} has the column(s) {repeated!r} more than once; keep one of each")
        missing = [name for name in CLASS_NAMES if name not in columns]
        if missing:
            raise AirysortError(
                f"{str(path)!r} has no column for class(es) {missing!r}; the header must "
                f"name all 11 classes: shot_id,{','.join(CLASS_NAMES)}"
            )
        for name in columns:
            if name not in CLASS_NAMES:
                sheet.notes.append((None, f"column {name!r} is not a class; ignored (known: {', '.join(CLASS_NAMES)})"))
        class_columns = [(1 + columns.index(name), c) for c, name in enumerate(CLASS_NAMES)]
        header_key = [name.strip().lower() for name in header]
        first_line_of: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            if not row or all(not text.strip() for text in row):
                continue
            if [text.strip().lower() for text in row] == header_key:
                sheet.notes.append((line, "the header again (sheets joined?); skipped"))
                continue
            shot = row[0].strip()
            if len(row) != len(header):
                values, problem = None, f"has {len(row)} fields, the header has {len(header)}"
            elif shot in first_line_of:
                values, problem = None, f"duplicate shot_id {shot!r} (first on line {first_line_of[shot]})"
            else:
                values, problem = _row_values(row, class_columns)
            if problem is None:
                first_line_of[shot] = line
            sheet.rows.append(LabelRow(line, shot, values, problem))
    return sheet


def _row_values(row: list[str], class_columns: list[tuple[int, int]]) -> tuple[np.ndarray | None, str | None]:
    """The 0/1 values of one row in taxonomy order, or why there are none."""
    values = np.zeros(N_CLASSES, np.int8)
    for column, c in class_columns:
        text = row[column].strip()
        value = label_cell_value(text)
        if value is None:
            return None, f"value {text!r} for class {CLASS_NAMES[c]!r} is not 0 or 1"
        values[c] = value
    # The reason only: `label` and `evaluate --truth` each say what they do with the row.
    if broken := label_row_problem(values):
        return None, broken
    return values, None


def problem_lines(problems: list[tuple[int | None, str]]) -> list[str]:
    """One message per problem, ``(line or None, text)`` pairs in file order; consecutive
    lines with one reason are joined, so a sheet of 200 rows with 10 filled in says so in
    one line, not 190."""
    lines = []
    for run in consecutive_runs(problems, key=lambda problem: problem[1], number=lambda problem: problem[0]):
        (first, text), last = run[0], run[-1][0]
        if first is None:
            lines.append(text)
        elif len(run) == 1:
            lines.append(f"line {first}: {text}")
        else:
            lines.append(f"lines {first}-{last} ({len(run)} rows): {text}")
    return lines
