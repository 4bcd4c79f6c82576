"""``airysort label STORE.zarr LABELS.csv``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, note_unused_cluster, say, user_errors


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store whose patterns are labelled.")],
    labels: Annotated[Path, typer.Argument(help="CSV: header 'shot_id,' + the 11 class names, "
                                                "one 0/1 row per pattern; with --sheet, the output directory.")],
    sheet: Annotated[bool, typer.Option("--sheet", help="Instead, pick a diverse unlabelled subset and write "
                                                        "contact sheets and a CSV to fill in, into the directory LABELS.")] = False,
    n: Annotated[int, typer.Option("--n", help="With --sheet: how many patterns to pick.")] = 96,
    seed: Annotated[int, typer.Option(help="With --sheet: random seed.")] = 0,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Import a researcher's labels for a subset of patterns into 'label'. Rows that cannot
    be used are reported one per line and counted (exit status 1 when no row could be).
    With --sheet, prepare the labelling."""
    note_unused_cluster(cluster, "label", "reads per-pattern tables in this process")
    if sheet:
        from pipeline.labelsheet import make_label_sheet

        result = make_label_sheet(store, labels, n=n, seed=seed)
        emit(result, json, lambda r: (
            f"picked {len(r['patterns'])} pattern(s) ({r['grouping']}); contact sheets: "
            f"{', '.join(r['sheets'])}; fill in {r['csv']} and run 'airysort label {store} {r['csv']}'"))
        return
    from pipeline.classify import import_labels

    result = import_labels(store, labels)
    for problem in result["problems"]:
        say(f"WARNING: {problem}")
    emit(result, json, lambda r: (
        f"imported {r['imported']} of {r['rows']} row(s) ({r['bad_rows']} bad row(s), "
        f"{r['bad_columns']} unknown column(s)); {r['labelled']} pattern(s) labelled in the store"))
    if result["bad_rows"] and not result["imported"]:
        raise typer.Exit(1)  # nothing usable: a script should stop here
