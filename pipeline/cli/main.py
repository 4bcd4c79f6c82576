"""The ``airysort`` command: assembles the per-command modules into one Typer app."""

from __future__ import annotations

import logging

import typer

from pipeline.allocator import restart_with_huge_pages
from pipeline.cli import demo, info, ingest, report, sort
from pipeline.cli import cluster, evaluate
from pipeline.cli import correlate, preprocess
from pipeline.cli import embed, latent
from pipeline.cli import explain, label, predict, train
from pipeline.cli import simulate, watch

app = typer.Typer(
    name="airysort",
    help="Classify and sort single-shot diffraction patterns from FEL beamtimes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def _version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"airysort {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Classify and sort single-shot diffraction patterns from FEL beamtimes."""
    # Library warnings on stderr, one line each, and nothing below. Without a handler of
    # our own, the first absl log call (orbax, when a checkpoint is loaded) gives the root
    # logger one that prints everything, and the INFO messages of distributed's start-up
    # and shutdown (its loggers are at INFO) bury the command's output.
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
        root.addHandler(handler)


# One line per command; each module holds only argument parsing for that command.
app.command("ingest")(ingest.command)
app.command("info")(info.command)
app.command("sort")(sort.command)
app.command("report")(report.command)
app.command("demo")(demo.command)
app.command("cluster")(cluster.command)
app.command("evaluate")(evaluate.command)
app.command("preprocess")(preprocess.command)
app.command("correlate")(correlate.command)
app.command("embed")(embed.command)
app.command("latent")(latent.command)
app.command("label")(label.command)
app.command("train")(train.command)
app.command("predict")(predict.command)
app.command("explain")(explain.command)
app.command("simulate")(simulate.command)
app.command("watch")(watch.command)


def main() -> None:
    restart_with_huge_pages()  # first: the process starts again where it helps
    app()


if __name__ == "__main__":
    main()
