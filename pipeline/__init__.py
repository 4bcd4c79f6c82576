"""airysort's data pipeline: Zarr store, ingest, preprocessing, clustering, reports.

The heavy lifting over many patterns is done by Dask graphs; the per-frame or
per-block kernels they map are plain NumPy/SciPy functions kept in ``*_kernels``
modules so that they can be tested and reused without Dask.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("airysort")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
