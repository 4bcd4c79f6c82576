"""Options and output handling shared by every command."""

from __future__ import annotations

import functools
import json
import sys
from typing import Annotated, Any, Callable

import typer

ClusterOption = Annotated[
    str,
    typer.Option(
        "--cluster",
        help="Where Dask runs: 'local' (embedded LocalCluster), 'local-threads' (one process), 'slurm', "
        "'slurm-gpu', 'pbs', 'lsf' (cluster-configs/*.yaml), a path to a cluster YAML, or a scheduler address.",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout as the last line.")
]


def say(message: str) -> None:
    """Human-readable output goes to stderr so that stdout stays machine-readable."""
    print(message, file=sys.stderr, flush=True)


def note_unused_cluster(cluster: str, command: str, runs_where: str) -> None:
    """Say that ``--cluster`` does not apply to ``command`` rather than ignore it silently."""
    if cluster != "local":
        say(f"note: --cluster {cluster} is not used by {command}, which {runs_where}")


def emit(result: dict[str, Any], as_json: bool, human: Callable[[dict], str] | None = None) -> None:
    """Print a command's result: JSON on stdout, or a human summary on stderr."""
    if as_json:
        print(json.dumps(result, default=_json_default), flush=True)
    elif human is not None:
        say(human(result))
    else:
        say(json.dumps(result, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def user_errors(function: Callable) -> Callable:
    """Turn :class:`~pipeline.errors.AirysortError` (and bad files) into one ``ERROR:`` line
    on stderr and exit status 1, instead of a traceback; Ctrl-C into one line and the
    shell's status for it, 130."""
    from pipeline.errors import AirysortError

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (AirysortError, OSError) as error:  # OSError: a path that is a directory, unwritable...
            say(f"ERROR: {error}")
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt as stopped:
            if stopped.args:  # the command says what it kept (train: its checkpoint)
                say(f"ERROR: interrupted; {stopped.args[0]}")
            else:
                say("ERROR: interrupted; the store keeps what was complete ('airysort info' names anything "
                    "left incomplete): run the command again to finish")
            raise typer.Exit(code=130) from None

    return wrapper
