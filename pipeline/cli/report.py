"""``airysort report STORE.zarr OUT_DIR``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import ClusterOption, JsonOption, emit, note_unused_cluster, user_errors


@user_errors
def command(
    store: Annotated[Path, typer.Argument(help="Zarr store.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory for report.html.")],
    explain_dir: Annotated[Optional[Path], typer.Option(help="Grad-CAM++ PNGs (default OUT_DIR/explain).")] = None,
    latent_dir: Annotated[Optional[Path], typer.Option(help="Latent-space PNGs (default OUT_DIR/latent).")] = None,
    benchmark_dir: Annotated[Optional[Path], typer.Option(help="Benchmark figures/tables (default OUT_DIR/benchmarks).")] = None,
    truth: Annotated[Optional[Path], typer.Option(help="Label CSV to score against (as evaluate --truth).")] = None,
    title: Annotated[str, typer.Option(help="Report title.")] = "airysort report",
    cluster: ClusterOption = "local",
    json: JsonOption = False,
) -> None:
    """Self-contained HTML report with figures and tables."""
    note_unused_cluster(cluster, "report", "reads per-pattern tables and a few images in this process")
    from pipeline.report import write_report

    result = write_report(store, out_dir, explain_dir=explain_dir, latent_dir=latent_dir, benchmark_dir=benchmark_dir,
                          truth_csv=truth, title=title)
    emit(result, json, lambda r: f"report: {r['report']} ({', '.join(r['sections'])})")
