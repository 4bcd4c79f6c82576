"""``airysort sort STORE.zarr OUT_DIR``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, note_unused_cluster, say, user_errors


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store with predictions and/or clusters.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory for index lists and galleries.")],
    export: Annotated[Optional[str], typer.Option(help="Also copy the raw frames of this class to a CXI file.")] = None,
    export_to: Annotated[Optional[Path], typer.Option(help="CXI file for --export (default OUT_DIR/<class>.cxi).")] = None,
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Per-class and per-cluster index lists (CSV) and galleries (PNG)."""
    note_unused_cluster(cluster, "sort", "reads per-pattern tables and a few images in this process")
    from pipeline.errors import AirysortError
    from pipeline.sort import export_patterns, safe_name, sort_store
    from pipeline.taxonomy import CLASS_NAMES

    if export:  # checked before the lists and galleries are written; any case ("prolate")
        named = {name.lower(): name for name in CLASS_NAMES}
        if export.strip().lower() not in named:
            raise AirysortError(f"unknown class {export!r}; choose one of: {', '.join(CLASS_NAMES)}")
        export = named[export.strip().lower()]
    result = sort_store(store, out_dir)
    if export:
        target = export_to or Path(out_dir) / f"{safe_name(export)}.cxi"
        result["exported"] = {"class": export, "file": str(target), "patterns": export_patterns(store, export, target)}
        say(f"exported {result['exported']['patterns']} {export} pattern(s) to {target}")

    def human(r: dict) -> str:
        lines = [f"wrote index lists and galleries to {r['out_dir']}"]
        lines += [f"  {name:<18} {count:>8}" for name, count in r["classes"].items()]
        for method, counts in r["clusters"].items():
            lines.append(f"  {method}: " + ", ".join(f"cluster {k}: {n}" for k, n in counts.items()))
        return "\n".join(lines)

    emit(result, json, human)
