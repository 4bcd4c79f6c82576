"""The store: schema, region writes one task per shard, locking, other Zarr v3 readers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline import store
from pipeline.errors import AirysortError
from pipeline.taxonomy import CLASS_NAMES
from tests.factories import repo_env


@pytest.fixture
def filled_store(tmp_path):
    path = tmp_path / "s.zarr"
    store.create_store(path, frame_shape=(6, 5), dtype="uint16", geometry={"wavelength": 13.5e-9})
    n = 600  # two full shards and a partial one
    store.resize_patterns(path, n)
    group = zarr.open_group(path, mode="r+")
    raw = np.arange(n * 30, dtype=np.uint16).reshape(n, 6, 5)
    group["raw"][:] = raw
    group["pattern"][:] = np.arange(n)
    group["label"][:] = -1
    return path, raw


def test_schema_matches_interface(filled_store):
    path, raw = filled_store
    ds = store.open_store(path)
    assert set(ds.dims) >= {"pattern", "y", "x", "class"}
    assert list(ds["class"].values) == list(CLASS_NAMES)
    for coord in ("shot_id", "source_file", "frame", "pulse_energy"):
        assert ds[coord].dims == ("pattern",)
    assert ds.raw.dtype == np.uint16 and ds.mask.dtype == bool and ds.label.dtype == np.int8
    assert ds.attrs["wavelength"] == 13.5e-9
    assert ds.raw.chunks[0] == (256, 256, 88)  # one Dask chunk per shard
    # Per-pattern coordinates and labels, stored in long chunks, are read one stored chunk
    # per task: in 256-pattern pieces every piece decoded its whole stored chunk again.
    for name in ("shot_id", "source_file", "frame", "pulse_energy", "label"):
        assert ds[name].data.chunks[0] == (600,), name
    raw_array = zarr.open_array(path / "raw")
    assert raw_array.shards == (store.PATTERN_CHUNK, 6, 5)
    assert "Blosc" in type(raw_array.compressors[0]).__name__


def test_write_variables_region_per_shard(filled_store, dask_threads):
    path, raw = filled_store
    ds = store.open_store(path)
    image = (ds.raw.astype("float32") / 2).rename(y="iy", x="ix")
    store.write_variables(path, {"image": image}, command="test", parameters={"scale": 0.5})
    ds = store.open_store(path)
    np.testing.assert_array_equal(ds.image.values, raw.astype("float32") / 2)
    assert zarr.open_array(path / "image").shards[0] == store.PATTERN_CHUNK
    assert ds.attrs["provenance"][-1]["parameters"] == {"scale": 0.5}
    assert ds.attrs["wavelength"] == 13.5e-9  # existing attributes survive the write
    # replacing a variable with another shape works
    small = xr.DataArray(np.ones((600, 3), np.float32), dims=("pattern", "z"))
    store.write_variables(path, {"image": small.rename(z="iy")}, command="test", parameters={})
    assert store.open_store(path).image.shape == (600, 3)


def test_write_variables_from_a_start_pattern(filled_store, dask_threads):
    """Patterns ``start:`` written into existing arrays: a start inside a shard and a region
    over three shards, each shard written by one task; the patterns before stay as they were."""
    path, raw = filled_store
    image = xr.DataArray(np.zeros((600, 6, 5), np.float32), dims=("pattern", "iy", "ix"))
    store.write_variables(path, {"image": image}, command="scale", parameters={"scale": 0.5})
    store.resize_patterns(path, 900)  # as ingest does when a file arrives
    new = (np.arange(900 - 100, dtype=np.float32)[:, None, None] + np.zeros((1, 6, 5), np.float32))
    assert store.region_chunks(100, 900) == (156, 256, 256, 132)
    store.write_variables(path, {"image": xr.DataArray(new, dims=("pattern", "iy", "ix"))},
                          command="scale", parameters={"scale": 0.5}, start=100)
    written = zarr.open_array(path / "image", mode="r")[:]
    np.testing.assert_array_equal(written[:100], 0)
    np.testing.assert_array_equal(written[100:], new)
    # A write that continues the last one's range with the same parameters extends it.
    store.resize_patterns(path, 1000)
    store.write_variables(path, {"image": xr.DataArray(np.ones((100, 6, 5), np.float32), dims=("pattern", "iy", "ix"))},
                          command="scale", parameters={"scale": 0.5}, start=900)
    np.testing.assert_array_equal(zarr.open_array(path / "image", mode="r")[900:], 1)
    entries = [e for e in store.read_attrs(path)["provenance"] if e["command"] == "scale"]
    assert [e["patterns"] for e in entries] == [[0, 600], [100, 1000]]
    with pytest.raises(AirysortError, match="has dims"):  # wrong number of patterns
        store.write_variables(path, {"image": xr.DataArray(new[:5], dims=("pattern", "iy", "ix"))},
                              command="scale", parameters={}, start=900)
    with pytest.raises(AirysortError, match="not in the store yet"):
        store.write_variables(path, {"latent": xr.DataArray(np.ones((100, 2), np.float32), dims=("pattern", "z"))},
                              command="embed", parameters={}, start=900)


def test_small_rows_are_stored_in_long_shards_one_write_task_each(filled_store, dask_threads, capsys):
    """Per-pattern numbers and short vectors (``prob``, ``hit``) go into COORD_CHUNK-pattern
    shards of PATTERN_CHUNK-pattern inner chunks, written from 256-pattern blocks (as
    ``predict`` makes them) by one task per shard, the progress counting the blocks; a region write into a partly filled long
    shard keeps the patterns before it. (Images keep PATTERN_CHUNK-pattern shards, whatever
    their size: test_write_variables_region_per_shard.)"""
    import dask.array as da

    path, _ = filled_store
    n = store.COORD_CHUNK + 3000  # one full long shard and a partial one
    store.resize_patterns(path, n)
    values = np.random.default_rng(0).random((n, len(CLASS_NAMES))).astype(np.float32)
    blocks = da.from_array(values, chunks=(store.PATTERN_CHUNK, -1))
    store.write_variables(path, {"prob": xr.DataArray(blocks, dims=("pattern", "class")),
                                 "hit": xr.DataArray(blocks[:, 0] > 0.5, dims=("pattern",))},
                          command="test", parameters={})
    # The bar counts the 256-pattern blocks each long shard's write gathers, not the writes.
    assert f"writing prob, hit: 0/{2 * blocks.numblocks[0]} shards" in capsys.readouterr().err
    for name in ("prob", "hit"):
        array = zarr.open_array(path / name, mode="r")
        assert (array.shards[0], array.chunks[0]) == (store.COORD_CHUNK, store.PATTERN_CHUNK)
    ds = store.open_store(path)
    assert ds.prob.data.chunks[0] == (store.COORD_CHUNK, 3000)
    np.testing.assert_array_equal(ds.prob.values, values)
    np.testing.assert_array_equal(ds.hit.values, values[:, 0] > 0.5)
    # New patterns from inside the first long shard on: two tasks, one per shard.
    start = store.COORD_CHUNK - 100
    store.resize_patterns(path, n + 50)
    tail = np.full((n + 50 - start, len(CLASS_NAMES)), 7.0, np.float32)
    store.write_variables(path, {"prob": xr.DataArray(da.from_array(tail, chunks=(64, -1)) + 0, dims=("pattern", "class"))},
                          command="test", parameters={}, start=start)
    # 50 blocks of 64 patterns; the one across the shard boundary counts as its two pieces.
    assert f"writing prob: 0/{-(-len(tail) // 64) + 1} shards" in capsys.readouterr().err
    written = zarr.open_array(path / "prob", mode="r")[:]
    np.testing.assert_array_equal(written[:start], values[:start])
    np.testing.assert_array_equal(written[start:], 7.0)


def test_read_pattern_values_from_a_start_or_at_chosen_patterns(filled_store):
    path, raw = filled_store
    labels = (np.arange(600 * len(CLASS_NAMES)).reshape(600, -1) % 2).astype(np.int8)
    store.write_pattern_variable_direct(path, "label", labels)
    np.testing.assert_array_equal(store.read_pattern_values(path, "label", start=250), labels[250:])
    np.testing.assert_array_equal(store.read_pattern_values(path, "raw"), raw)
    picks = np.array([301, 7, 7, 120])  # any order, repeats allowed, across shards
    np.testing.assert_array_equal(store.read_pattern_values(path, "raw", patterns=picks), raw[picks])
    assert store.read_pattern_values(path, "raw", patterns=[]).shape == (0, *raw.shape[1:])
    with pytest.raises(AirysortError, match="does not exist"):
        store.read_pattern_values(path.parent / "missing.zarr", "label")


class Interrupted(Exception):
    pass


def test_a_failed_write_leaves_its_variables_marked_and_unused(filled_store, dask_threads, capsys):
    """A command that fails (or is interrupted) half-way through writing leaves its
    variables marked incomplete: readers drop them with a warning, ``info`` names them,
    and the next complete write of them clears the mark. Also for region writes."""
    from pipeline.info import format_info, store_info

    path, raw = filled_store
    good = (store.open_store(path).raw.astype("float32") / 2).rename(y="iy", x="ix")
    store.write_variables(path, {"image": good}, command="preprocess", parameters={})

    def fail_on_the_second_shard(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 1:
            raise Interrupted
        return block

    failing = good.copy(data=good.data.map_blocks(fail_on_the_second_shard, dtype=np.float32))
    with pytest.raises(Interrupted):
        store.write_variables(path, {"image": failing}, command="preprocess", parameters={})
    capsys.readouterr()  # what the failed write printed
    ds = store.open_store(path)
    warning = capsys.readouterr().err
    assert "image" not in ds and "raw" in ds
    assert warning.startswith("WARNING: 'image' in") and "interrupted or failed 'preprocess'" in warning
    info = store_info(path)
    assert set(info["incomplete"]) == {"image"} and "image" not in info["variables"]
    assert "'image' was left incomplete by 'preprocess'" in format_info(info)

    store.write_variables(path, {"image": good}, command="preprocess", parameters={})  # run again
    np.testing.assert_array_equal(store.open_store(path).image.values, raw.astype("float32") / 2)
    assert store.incomplete_variables(store.read_attrs(path)) == {}

    store.resize_patterns(path, 700)  # a file arrives (watch): a region write fails
    tail = xr.DataArray(np.ones((300, 6, 5), np.float32), dims=("pattern", "iy", "ix")).chunk({"pattern": 100})
    tail = tail.copy(data=tail.data.map_blocks(fail_on_the_second_shard, dtype=np.float32))
    with pytest.raises(Interrupted):
        store.write_variables(path, {"image": tail}, command="preprocess", parameters={}, start=400)
    assert "image" not in store.open_store(path)


def test_results_computed_before_their_input_was_rewritten_are_flagged(filled_store, dask_threads, capsys):
    from pipeline.info import format_info, store_info

    path, _ = filled_store
    ones = xr.DataArray(np.ones((600, 3), np.float32), dims=("pattern", "z"))

    def write(command, names, **parameters):
        store.write_variables(path, {name: ones for name in names}, command=command, parameters=parameters)

    write("preprocess", ["image"])
    write("predict", ["prob", "predicted"], input="image")
    write("embed", ["latent"], input="image")
    write("cluster", ["cluster_gmm"], method="gmm")
    assert store.stale_variables(store.read_attrs(path)) == {}
    write("correlate", ["ccf"])
    write("preprocess", ["image", "centre_y"], size=64)  # images and centres made again
    stale = store.stale_variables(store.read_attrs(path))
    # ... and what follows from them: the clustering of the now out-of-date latents too
    assert set(stale) == {"prob", "predicted", "latent", "cluster_gmm", "ccf"}
    assert stale["prob"]["input"] == "image" and stale["prob"]["command"] == "preprocess"
    assert stale["cluster_gmm"]["input"] == "latent" and stale["ccf"]["input"] == "centre_y"
    capsys.readouterr()
    store.open_store(path)
    warned = capsys.readouterr().err  # one line per input, naming it
    assert f"'latent', 'predicted', 'prob' in {str(path)!r} came from 'image' before 'preprocess'" in warned
    assert f"'ccf' in {str(path)!r} came from 'centre_y'" in warned
    assert f"'cluster_gmm' in {str(path)!r} came from 'latent'" in warned
    assert "NOTE: 'predicted' came from 'image' before 'preprocess' rewrote it" in format_info(store_info(path))
    write("embed", ["latent"], input="image")  # embedded again: now only the clustering is behind
    write("correlate", ["ccf"])
    assert set(store.stale_variables(store.read_attrs(path))) == {"prob", "predicted", "cluster_gmm"}
    write("predict", ["prob", "predicted"], input="ccf")  # a model on ccf does not follow image
    write("cluster", ["cluster_gmm"], method="gmm")
    assert store.stale_variables(store.read_attrs(path)) == {}

    # A file arrives (watch): what was not written for it covers only the earlier patterns.
    store.resize_patterns(path, 700)
    tail = xr.DataArray(np.ones((100, 3), np.float32), dims=("pattern", "z"))
    for command, names in (("preprocess", ["image", "centre_y"]), ("predict", ["prob", "predicted"])):
        store.write_variables(path, {name: tail for name in names}, command=command, parameters={}, start=600)
    assert store.partial_variables(store.read_attrs(path), 700) == {"latent": 600, "cluster_gmm": 600, "ccf": 600}
    capsys.readouterr()
    store.open_store(path)
    assert "'ccf' (patterns 0..599), 'cluster_gmm' (patterns 0..599)" in capsys.readouterr().err
    assert "NOTE: 'latent' covers patterns 0..599 of 700" in format_info(store_info(path))


def test_write_variables_rejects_wrong_length(filled_store, dask_threads):
    path, _ = filled_store
    bad = xr.DataArray(np.ones((10, 2), np.float32), dims=("pattern", "z"))
    with pytest.raises(AirysortError, match="length 600"):
        store.write_variables(path, {"latent": bad}, command="test", parameters={})


def test_second_writer_is_refused(filled_store):
    import subprocess
    import sys

    path, _ = filled_store
    code = f"from pipeline import store\nwith store.write_lock({str(path)!r}, 'preprocess'): pass\n"
    holder = f"from pipeline import store\nprint(store.lock_holder({str(path)!r}))"
    with store.write_lock(path, "ingest"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        # Readers are told the writer is at work, not that it was interrupted.
        seen = subprocess.run([sys.executable, "-c", holder], capture_output=True, text=True).stdout
    assert result.returncode != 0
    assert "is being written by airysort ingest (pid" in result.stderr
    assert seen.startswith("airysort ingest (pid")
    # once released, the lock can be taken again
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert subprocess.run([sys.executable, "-c", holder], capture_output=True, text=True).stdout.strip() == "None"


def test_missing_store_has_clear_error(tmp_path):
    with pytest.raises(AirysortError, match="does not exist"):
        store.open_store(tmp_path / "nothing.zarr")


def test_other_zarr_v3_readers_open_it(filled_store):
    path, raw = filled_store
    store.consolidate(path)
    # zarr-python directly
    group = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(group["raw"][5:300], raw[5:300])
    assert group["raw"].metadata.dimension_names == ("pattern", "y", "x")
    # tensorstore, an independent implementation of Zarr v3 (sharding + blosc)
    tensorstore = pytest.importorskip("tensorstore")
    array = tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "raw")}}).result()
    np.testing.assert_array_equal(array[250:600].read().result(), raw[250:600])
    # The label columns' names without zarr-python's string type (tensorstore lacks it).
    labels = tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "label")}}).result()
    assert labels.shape[1] == len(json.loads((path / "zarr.json").read_text())["attributes"]["class_names"])
    assert json.loads((path / "zarr.json").read_text())["attributes"]["class_names"] == list(CLASS_NAMES)


NO_CLIENT_SCRIPT = """
import sys
import numpy as np
from pipeline import store
from pipeline.correlate import correlate_store
from pipeline.errors import AirysortError
from pipeline.ingest import ingest
from pipeline.preprocess import preprocess_store
from tests.factories import random_frames, write_stacked_cxi

if __name__ == "__main__":
    tmp = sys.argv[1]
    cxi = write_stacked_cxi(f"{tmp}/a.cxi", random_frames(20, shape=(64, 64)) * 40)
    path = f"{tmp}/s.zarr"
    # No client anywhere: each call runs on a cluster of its own.
    ingest(path, [cxi], cluster="local-threads", log=lambda line: None)
    preprocess_store(path, size=16, cluster="local-threads")
    correlate_store(path, n_q=4, n_phi=8, cluster="local-threads")
    image = store.open_store(path)["image"].values
    import xarray as xr
    try:
        store.write_variables(path, {"image": xr.DataArray(np.zeros_like(image), dims=("pattern", "iy", "ix"))},
                              command="test", parameters={})
    except AirysortError as error:
        print("refused:", error)
    again = store.open_store(path)
    assert set(store.incomplete_variables(store.read_attrs(path))) == set(), "marked incomplete"
    np.testing.assert_array_equal(again["image"].values, image)
    assert "ccf" in again
    print("ok")
"""


def test_store_functions_run_without_a_client_and_writes_refuse_before_touching(tmp_path):
    """From a plain script: ingest, preprocess_store and correlate_store start a cluster
    of their own; a bare store write without a client changes nothing."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "no_client.py"
    script.write_text(NO_CLIENT_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=root, capture_output=True, text=True,
                         timeout=600, env=repo_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "refused: writing to the store needs a Dask client" in run.stdout
    assert run.stdout.strip().endswith("ok")
