"""Angular cross-correlation as a Dask graph: oracle on uneven chunks, the store, the CLI."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import correlate, store
from pipeline import correlate_kernels as ck
from pipeline.cli.main import app
from tests.pipeline.test_preprocess import UNEVEN, beamtime, make_store, sharded_store, task_prefixes
from tests.pipeline.test_preprocess_kernels import SHAPE, detector_mask

runner = CliRunner()


@pytest.mark.parametrize("variant", ["auto", "cross"])
def test_oracle_on_uneven_chunks(variant):
    frames, _, _ = beamtime(14, 10)
    centres = np.random.default_rng(0).uniform(124, 131, (24, 2))
    settings = ck.CorrelateSettings(
        mask=detector_mask(), background=np.zeros(SHAPE, np.float32), r_min=9, r_max=110, n_q=12, n_phi=32,
        variant=variant,
    )
    lazy = correlate.correlate_array(
        da.from_array(frames, chunks=(UNEVEN, -1, -1)), da.from_array(centres, chunks=(5, 2)), settings=settings
    )
    assert lazy.chunks[0] == UNEVEN
    np.testing.assert_array_equal(lazy.compute(), ck.correlate_block(frames, centres, settings=settings))


def test_each_shard_is_read_in_the_task_that_correlates_it(tmp_path):
    path, _ = sharded_store(tmp_path, store.PATTERN_CHUNK + 44, SHAPE)
    raw = store.open_store(path)["raw"].data
    settings = ck.CorrelateSettings(mask=detector_mask(), background=np.zeros(SHAPE, np.float32), r_min=9, r_max=110,
                                    n_q=4, n_phi=8)
    centres = da.from_array(np.full((raw.shape[0], 2), 127.5), chunks=(raw.chunks[0], 2))
    ccf = correlate.correlate_array(raw, centres, settings=settings)
    assert "from-zarr" not in task_prefixes(ccf)


def test_cli_after_preprocess(tmp_path, dask_threads):
    frames, hits, _ = beamtime(6, 2, seed=7)
    path = make_store(tmp_path, frames)
    outcome = runner.invoke(app, ["correlate", str(path), "--cluster", "local-threads"])
    assert outcome.exit_code == 1
    assert "run 'airysort preprocess" in outcome.output

    assert runner.invoke(app, ["preprocess", str(path), "--size", "32", "--cluster", "local-threads"]).exit_code == 0
    outcome = runner.invoke(
        app, ["correlate", str(path), "--n-q", "16", "--n-phi", "48", "--cluster", "local-threads", "--json"]
    )
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout.strip().splitlines()[-1])
    assert result["patterns"] == 8 and result["hits"] == 6 and result["shape"] == [16, 48]
    assert result["parameters"]["variant"] == "auto"
    ds = store.open_store(path)
    assert ds.ccf.dims == ("pattern", "q1", "phi") and ds.ccf.shape == (8, 16, 48)
    ccf = ds.ccf.values
    assert np.all(np.abs(ccf) <= 1) and np.allclose(ccf[hits, :, 0], 1)  # normalised: C(q, 0) = 1
    # The wavelength, distance and pixel size from the CXI file give the rings' q.
    assert ds.q1_momentum.attrs["units"] == "1/m" and np.all(np.diff(ds.q1_momentum.values) > 0)
    # The stored ccf is what the kernel gives for the stored centres.
    centres = np.stack([ds.centre_y.values, ds.centre_x.values], axis=1)
    settings = ck.CorrelateSettings(
        mask=ds.preprocess_mask.values, background=ds.background.values, r_min=result["r_min"],
        r_max=result["r_max"], n_q=16, n_phi=48, saturation=65535,
    )
    np.testing.assert_array_equal(ccf[3], ck.correlate_frame(frames[3], centre=tuple(centres[3]), settings=settings))

    # The cross-q variant replaces ccf, with other dimensions.
    outcome = runner.invoke(
        app, ["correlate", str(path), "--n-q", "8", "--n-phi", "16", "--cross-q", "--cluster", "local-threads"]
    )
    assert outcome.exit_code == 0, outcome.output
    ds = store.open_store(path)
    assert ds.ccf.dims == ("pattern", "q1", "q2", "phi") and ds.ccf.shape == (8, 8, 8, 16)
    assert ds.attrs["provenance"][-1]["parameters"]["variant"] == "cross"
