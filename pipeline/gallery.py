"""Contact sheets of diffraction patterns (matplotlib), shared by sort, label and report."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import xarray as xr


def display_images(dataset: xr.Dataset, patterns: Sequence[int]) -> np.ndarray:
    """Images to show for ``patterns``: the preprocessed ``image`` when the store has it,
    else ``log10(1 + raw)`` with masked pixels set to 0. Shape (n, h, w), float32."""
    patterns = np.asarray(patterns, dtype=np.int64)
    if len(patterns) == 0:
        return np.zeros((0, 1, 1), np.float32)
    if "image" in dataset:
        return np.asarray(dataset["image"].isel(pattern=patterns).values, np.float32)
    raw = np.asarray(dataset["raw"].isel(pattern=patterns).values, np.float32)
    shown = np.log10(1 + np.clip(raw, 0, None))
    if "mask" in dataset:
        shown[:, np.asarray(dataset["mask"].values, bool)] = 0
    return shown


def contact_sheet(
    images: np.ndarray,
    path: str | os.PathLike,
    *,
    captions: Sequence[str] | None = None,
    title: str | None = None,
    columns: int = 8,
    tile_inches: float = 1.6,
) -> str:
    """Save ``images`` (n, h, w) as a grid PNG with a caption under each tile.

    Each tile is scaled to its own 1st–99.5th percentile so weak and strong shots are both
    visible. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    columns = max(1, min(columns, n)) if n else 1
    rows = max(1, -(-n // columns))
    width, height = columns * tile_inches, rows * tile_inches + 0.6
    figure, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False)
    # Fixed margins: the tiles never overlap, and tight_layout (which measures every
    # caption) took most of the time of a sheet.
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.55 / height,
                           wspace=0.05, hspace=0.18 * 1.6 / tile_inches)
    for index, axis in enumerate(axes.flat):
        axis.set_axis_off()
        if index >= n:
            continue
        image = images[index]
        low, high = np.percentile(image, [1, 99.5]) if image.size else (0, 1)
        axis.imshow(image, cmap="magma", vmin=low, vmax=high if high > low else low + 1, interpolation="nearest")
        if captions is not None:
            axis.set_title(captions[index], fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "no patterns", ha="center", va="center")
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return str(path)
