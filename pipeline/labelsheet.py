"""A labelling aid: pick a diverse subset, print contact sheets and a CSV to fill in.

``airysort label --sheet STORE OUT_DIR --n N`` picks N unlabelled patterns spread over the
structure of the data set (the GMM clusters when the store has them, else k-means on the
latents or on small copies of the images), draws them on contact sheets with their index
numbers and shot ids, and writes ``labels_to_fill.csv``: the header of interface.md and one
row of zeros per pattern. The researcher sets the 1s and imports the file with
``airysort label STORE labels_to_fill.csv``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import store
from pipeline.errors import AirysortError, check_seed
from pipeline.gallery import contact_sheet, display_images
from pipeline.taxonomy import CLASS_NAMES, N_CLASSES

FEATURE_SAMPLE = 5000  # patterns used to find the groups when no clustering is stored


def _groups(dataset, candidates: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, str]:
    """A group number per candidate pattern, and how the groups were found (clusters or
    latents only where they cover every pattern: patterns ingested since have none)."""
    partial = store.partial_variables(dataset.attrs, int(dataset.sizes["pattern"]))
    if "cluster_gmm" in dataset and "cluster_gmm" not in partial:
        return np.asarray(dataset["cluster_gmm"].values)[candidates], "cluster_gmm"
    from sklearn.cluster import MiniBatchKMeans

    if "latent" in dataset and "latent" not in partial:
        features, source = np.asarray(dataset["latent"].isel(pattern=candidates).values), "k-means on latent"
    else:
        images = display_images(dataset, candidates)
        step = max(1, images.shape[-1] // 16)
        features, source = images[:, ::step, ::step].reshape(len(images), -1), "k-means on images"
    model = MiniBatchKMeans(n_clusters=min(k, len(candidates)), random_state=seed, n_init=3)
    return model.fit_predict(features), source


def write_label_csv(path: Path, shot_ids: np.ndarray, labels: np.ndarray) -> Path:
    """A label CSV in the format of interface.md: ``shot_id`` + the 11 class names."""
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["shot_id", *CLASS_NAMES])
        for shot, row in zip(shot_ids, labels):
            writer.writerow([shot, *(int(v) for v in row)])
    return path


def make_label_sheet(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    n: int = 96,
    per_sheet: int = 48,
    seed: int = 0,
) -> dict[str, Any]:
    """Pick ``n`` diverse unlabelled patterns; write contact sheets and a CSV template.

    Parameters
    ----------
    path : path-like
        The store.
    out_dir : path-like
        Output directory (created): ``sheet_XX.png`` and ``labels_to_fill.csv``.
    n : int, default=96
        Patterns to label.
    per_sheet : int, default=48
        Tiles per contact sheet.
    seed : int, default=0
        Seed of the random choices.

    Returns
    -------
    dict
        ``patterns`` (chosen indices), ``sheets`` (PNG paths), ``csv`` and ``grouping``.
    """
    if n < 1:
        raise AirysortError(f"--n must be at least 1, got {n!r}")
    seed = check_seed(seed)
    csv_path = store.check_output_dir(out_dir, path) / "labels_to_fill.csv"
    if csv_path.exists():
        raise AirysortError(
            f"{str(csv_path)!r} exists and may hold labels filled in already; import it with "
            f"'airysort label {path} {csv_path}', or choose another directory"
        )
    dataset = store.open_store(path)
    if "image" in dataset:  # the sheet shows them
        store.require_every_pattern(dataset, "image", remedy=f"airysort preprocess {path}")
    labels = np.asarray(dataset["label"].values)
    unlabelled = np.flatnonzero((labels < 0).any(axis=1))
    if len(unlabelled) == 0:
        raise AirysortError(
            f"every pattern of {str(path)!r} is labelled already (files that carry labels, such as "
            "simulated ones, bring them along); to label by hand, ingest them into a new store with "
            "'airysort ingest STORE FILES --no-labels'")
    rng = np.random.default_rng(seed)
    candidates = np.sort(rng.choice(unlabelled, min(len(unlabelled), FEATURE_SAMPLE), replace=False))
    groups, grouping = _groups(dataset, candidates, k=max(2, min(12, n // 4)), seed=seed)

    # Round-robin over the groups so that rare kinds of pattern are not drowned by common ones.
    queues = [list(rng.permutation(candidates[groups == g])) for g in np.unique(groups)]
    chosen: list[int] = []
    while len(chosen) < min(n, len(candidates)):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(int(queue.pop()))
    chosen_array = np.sort(np.asarray(chosen, dtype=np.int64))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shot_ids = np.asarray(dataset["shot_id"].values).astype(object)
    sheets = []
    for number, start in enumerate(range(0, len(chosen_array), per_sheet)):
        page = chosen_array[start : start + per_sheet]
        sheets.append(contact_sheet(
            display_images(dataset, page), out / f"sheet_{number + 1:02d}.png",
            captions=[f"#{p} {shot_ids[p]}" for p in page], title=f"airysort label sheet {number + 1}", columns=8,
        ))
    write_label_csv(csv_path, shot_ids[chosen_array], np.zeros((len(chosen_array), N_CLASSES), np.int8))
    return {"patterns": chosen_array.tolist(), "sheets": sheets, "csv": str(csv_path), "grouping": grouping}
