"""Contact sheets of diffraction patterns (matplotlib), shared by sort, label and report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from pipeline import store


def display_images(dataset: xr.Dataset, patterns: Sequence[int]) -> np.ndarray:
    """Images to show for ``patterns``: the preprocessed ``image`` when the store has it,
    else ``log10(1 + raw)`` with masked pixels set to 0. Shape (n, h, w), float32."""
    patterns = np.asarray(patterns, dtype=np.int64)
    if len(patterns) == 0:
        return np.zeros((0, 1, 1), np.float32)
    name = "image" if "image" in dataset else "raw"
    source = dataset.encoding.get("source")  # the store the dataset was opened from
    if source is not None and Path(source, name, "zarr.json").exists():
        # Straight from Zarr: a few scattered patterns read only their inner chunks.
        values = store.read_pattern_values(source, name, patterns=patterns)
    else:
        values = dataset[name].isel(pattern=patterns).values
    if name == "image":
        return np.asarray(values, np.float32)
    raw = np.asarray(values, np.float32)
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
    """Save ``images`` (n, h, w) as a grid PNG with a caption above each tile.

    Each tile is scaled to its own 1st–99.5th percentile so weak and strong shots are both
    visible. The tiles are coloured and laid out as one mosaic image, drawn once: one
    matplotlib Axes per tile took most of a sheet's time. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images, np.float32)
    n = len(images)
    columns = max(1, min(columns, n)) if n else 1
    rows = max(1, -(-n // columns))
    caption_inches, title_inches = 0.22, 0.45
    figure = plt.figure(figsize=(columns * tile_inches, rows * (tile_inches + caption_inches) + title_inches))
    axis = figure.add_axes((0.0, 0.0, 1.0, 1.0 - title_inches / figure.get_figheight()))
    axis.set_axis_off()
    if n:
        mosaic, (cell_height, cell_width) = _mosaic(images, columns, rows,
                                                    caption_fraction=caption_inches / tile_inches)
        axis.imshow(mosaic, interpolation="antialiased", aspect="auto")
        for index, caption in enumerate(captions or []):
            row, column = divmod(index, columns)
            axis.text((column + 0.5) * cell_width, row * cell_height + 1, caption, fontsize=7,
                      ha="center", va="top")
    else:
        axis.text(0.5, 0.5, "no patterns", ha="center", va="center", transform=axis.transAxes)
    if title:
        figure.suptitle(title, fontsize=10, y=1.0 - 0.1 / figure.get_figheight(), va="top")
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return str(path)


def _mosaic(images: np.ndarray, columns: int, rows: int, *, caption_fraction: float
            ) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB mosaic of ``images`` in the magma colour map on white: each cell is a caption
    band, then the tile, with a thin margin on either side.

    Returns the mosaic, shape (rows * cell_height, columns * cell_width, 3), and the
    cell's (height, width) in mosaic pixels."""
    from matplotlib import colormaps

    n, h, w = images.shape
    band, margin = int(round(caption_fraction * h)), max(1, w // 40)
    cell_height, cell_width = band + h, w + 2 * margin
    mosaic = np.ones((rows * cell_height, columns * cell_width, 3), np.float32)
    low, high = np.percentile(images.reshape(n, -1), [1, 99.5], axis=1)
    scaled = (images - low[:, None, None]) / np.where(high > low, high - low, 1.0)[:, None, None]
    coloured = colormaps["magma"](np.clip(scaled, 0.0, 1.0))[..., :3]
    for index in range(n):
        row, column = divmod(index, columns)
        top, left = row * cell_height + band, column * cell_width + margin
        mosaic[top : top + h, left : left + w] = coloured[index]
    return mosaic, (cell_height, cell_width)
