"""What a store holds: counts, variables with their chunking, rejects and provenance."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import zarr

from pipeline import store
from pipeline.ingest import reject_lines


def store_info(path: str | os.PathLike, *, max_rejects: int = 20) -> dict[str, Any]:
    """Summarise the store at ``path`` (reads metadata and small variables only).

    Returns
    -------
    dict
        ``patterns``, ``labelled``, ``hit_rate`` (when hit finding ran), ``variables``
        (dims, shape, dtype, chunks, shards, compressor per variable), ``files``,
        ``rejected`` and the first ``max_rejects`` rejects (``rejects``, and ``reject_lines``
        with consecutive frames of one file and reason on one line), ``geometry``, ``provenance``,
        ``pending_ingest``, ``incomplete`` (variables an interrupted command left
        half-written, not shown under ``variables``) and ``stale`` (variables computed from
        one that has been rewritten since, :func:`pipeline.store.stale_variables`).
    """
    dataset = store.open_store(path, warn=False)  # the notes below say it instead
    attrs = store.read_attrs(path)
    committed = store.n_committed(path)
    group = zarr.open_group(path, mode="r", use_consolidated=False)
    variables = {}
    for name in sorted(dataset.variables):
        array = group[name]
        variables[name] = {
            "dims": list(dataset[name].dims),
            "shape": list(dataset[name].shape),
            "dtype": str(array.dtype),
            "chunks": list(array.chunks),
            "shards": list(array.shards) if array.shards else None,
            "compressors": [type(c).__name__ for c in array.compressors],
        }
    info: dict[str, Any] = {
        "store": str(path),
        "patterns": int(dataset.sizes.get("pattern", 0)),
        "files": len(attrs.get("ingested_files", [])),
        "rejected": len(attrs.get("rejects", [])),
        "rejects": attrs.get("rejects", [])[:max_rejects],
        # Consecutive frames rejected for one reason (a file from another detector) share a line.
        "reject_lines": reject_lines(attrs.get("rejects", []))[:max_rejects],
        "geometry": {k: attrs.get(k) for k in ("wavelength", "detector_distance", "pixel_size")},
        "variables": variables,
        "provenance": attrs.get("provenance", []),
        "pending_ingest": committed < group["pattern"].shape[0],
        "incomplete": store.incomplete_variables(attrs),
        "stale": store.stale_variables(attrs),
        "partial": store.partial_variables(attrs, committed),
    }
    if "label" in dataset and info["patterns"]:
        labels = dataset["label"].values
        info["labelled"] = int((labels >= 0).all(axis=1).sum())
    if "hit" in dataset and info["patterns"]:
        # Over the patterns hit finding has seen (not those ingested since).
        covered = store.covered(dataset, "hit")
        if covered.any():
            info["hit_rate"] = float(np.asarray(dataset["hit"].values, bool)[covered].mean())
    return info


def format_info(info: dict[str, Any]) -> str:
    """The human-readable summary ``airysort info`` prints."""
    lines = [
        f"store      {info['store']}",
        f"patterns   {info['patterns']} from {info['files']} file(s); {info['rejected']} rejected",
    ]
    if "labelled" in info:
        lines.append(f"labelled   {info['labelled']}")
    if "hit_rate" in info:
        lines.append(f"hit rate   {info['hit_rate']:.1%}")
    geometry = info["geometry"]
    lines.append(
        "geometry   " + ", ".join(f"{k} = {v:.4g} m" if v is not None else f"{k} unknown" for k, v in geometry.items())
    )
    lines.append("variables")
    for name, v in info["variables"].items():
        shards = f" shards {tuple(v['shards'])}" if v["shards"] else ""
        lines.append(f"  {name:<16} {str(tuple(v['dims'])):<26} {str(tuple(v['shape'])):<20} {v['dtype']:<8} chunks {tuple(v['chunks'])}{shards}")
    if info["rejects"]:
        lines.append("rejects (first shown)")
        lines += [f"  {line}" for line in info["reject_lines"]]
    if info["provenance"]:
        lines.append("provenance")
        for p in info["provenance"]:
            written = f"  patterns {p['patterns'][0]}..{p['patterns'][1] - 1}" if p.get("patterns") else ""
            lines.append(f"  {p['time']}  {p['command']:<11} airysort {p['version']}{written}")
    if info["pending_ingest"]:
        lines.append("NOTE: an interrupted ingest is pending; run 'airysort ingest' again to complete it")
    for name, stop in info["partial"].items():
        lines.append(f"NOTE: {name!r} covers patterns 0..{stop - 1} of {info['patterns']}; compute it again")
    for name, mark in info["stale"].items():
        lines.append(f"NOTE: {name!r} came from {mark['input']!r} before '{mark['command']}' rewrote it "
                     f"({mark['since']}); compute it again")
    for name, mark in info["incomplete"].items():
        lines.append(f"NOTE: {name!r} was left incomplete by '{mark['command']}' (started {mark['since']}); "
                     f"run 'airysort {mark['command']}' again")
    return "\n".join(lines)
