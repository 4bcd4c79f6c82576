"""Ingest: both CXI layouts bit-exact against h5py, labels, rejects, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from pipeline import store
from pipeline.cli.main import app
from pipeline.errors import AirysortError
from pipeline.ingest import Reject, ingest, reject_lines
from pipeline.taxonomy import CLASS_NAMES
from tests.factories import random_frames, random_labels, repo_env, write_entries_cxi, write_stacked_cxi

runner = CliRunner()


def read_all_h5(path, dataset):
    with h5py.File(path, "r") as h5:
        return h5[dataset][()]


class TestLayouts:
    def test_stacked_cxi_bit_exact_with_metadata(self, tmp_path, dask_threads):
        frames, labels = random_frames(300), random_labels(300)
        mask = np.zeros(frames.shape[1:], bool)
        mask[10:14, 0:3] = True
        cxi = write_stacked_cxi(tmp_path / "run1.cxi", frames, labels=labels, mask=mask,
                                pulse_energy=np.linspace(1e-3, 2e-3, 300), shot_ids=[f"s{i}" for i in range(300)])
        result = ingest(tmp_path / "s.zarr", [cxi])
        assert result == {"ingested": 300, "rejected": 0, "skipped_files": 0, "patterns": 300}
        ds = store.open_store(tmp_path / "s.zarr")
        np.testing.assert_array_equal(ds.raw.values, read_all_h5(cxi, "entry_1/data_1/data"))
        assert ds.raw.dtype == np.uint16
        np.testing.assert_array_equal(ds.label.values, labels)
        np.testing.assert_array_equal(ds.mask.values, mask)
        assert list(ds.shot_id.values[:2]) == ["s0", "s1"]
        np.testing.assert_allclose(ds.pulse_energy.values, np.linspace(1e-3, 2e-3, 300))
        assert ds.attrs["detector_distance"] == 0.37 and ds.attrs["pixel_size"] == 75e-6
        np.testing.assert_array_equal(ds.frame.values, np.arange(300))
        # --no-labels: the same frames, every pattern unlabelled (to label them by hand).
        result = CliRunner().invoke(app, ["ingest", str(tmp_path / "u.zarr"), str(cxi), "--no-labels",
                                          "--cluster", "local-threads"])
        assert result.exit_code == 0, result.output
        unlabelled = store.open_store(tmp_path / "u.zarr")
        assert (unlabelled.label.values == -1).all()
        np.testing.assert_array_equal(unlabelled.raw.values, ds.raw.values)

    def test_entries_layout_bit_exact(self, tmp_path, dask_threads):
        frames, labels = random_frames(7, dtype=np.float32), random_labels(7)
        cxi = write_entries_cxi(tmp_path / "cxidb94.cxi", frames, labels=labels)
        ingest(tmp_path / "s.zarr", [cxi])
        ds = store.open_store(tmp_path / "s.zarr")
        with h5py.File(cxi, "r") as h5:
            expected = np.stack([h5[f"entry_{k}/instrument_1/detector_1/data"][()] for k in range(1, 8)])
        np.testing.assert_array_equal(ds.raw.values, expected)
        np.testing.assert_array_equal(ds.label.values, labels)
        assert ds.shot_id.values[0] == "run7-shot00001"
        assert ds.attrs["wavelength"] == pytest.approx(13.5e-9, rel=1e-3)  # from photon energy

    def test_hdf5_dataset_and_npy_append(self, tmp_path, dask_threads):
        frames = random_frames(5)
        with h5py.File(tmp_path / "plain.h5", "w") as h5:
            h5["detector/frames"] = frames
        np.save(tmp_path / "more.npy", frames[:3])
        path = tmp_path / "s.zarr"
        ingest(path, [tmp_path / "plain.h5"], dataset="detector/frames")
        result = ingest(path, [tmp_path / "more.npy"])
        assert result["patterns"] == 8
        ds = store.open_store(path)
        np.testing.assert_array_equal(ds.raw.values, np.concatenate([frames, frames[:3]]))
        assert (ds.label.values == -1).all()

    def test_calibrated_float64_frames_append_to_a_float32_store_rounded(self, tmp_path, dask_threads):
        """Float frames of a later file with more precision than the store keeps are rounded
        to it, with a warning; into an integer store they must still be exact."""
        rng = np.random.default_rng(3)
        photons = rng.gamma(2.0, 1.5, (4, 8, 8))
        np.save(tmp_path / "first.npy", photons.astype(np.float32))
        np.save(tmp_path / "second.npy", photons + 1e-9)
        path = tmp_path / "s.zarr"
        ingest(path, [tmp_path / "first.npy"])
        lines = []
        result = ingest(path, [tmp_path / "second.npy"], log=lines.append)
        assert (result["ingested"], result["rejected"]) == (4, 0)
        assert any(line.startswith("WARNING: ") and "rounded to float32" in line for line in lines)
        raw = store.open_store(path).raw.values
        assert raw.dtype == np.float32
        np.testing.assert_array_equal(raw[4:], (photons + 1e-9).astype(np.float32))
        np.save(tmp_path / "huge.npy", np.full((2, 8, 8), 1e300))
        assert ingest(path, [tmp_path / "huge.npy"], log=lines.append)["rejected"] == 2

    def test_reingest_is_noop_unless_forced(self, tmp_path, dask_threads):
        cxi = write_stacked_cxi(tmp_path / "a.cxi", random_frames(4))
        path = tmp_path / "s.zarr"
        ingest(path, [cxi])
        assert ingest(path, [cxi])["skipped_files"] == 1
        assert store.n_committed(path) == 4
        assert ingest(path, [cxi], force=True)["patterns"] == 8


class TestRejects:
    def test_bad_frames_rejected_and_counted(self, tmp_path, dask_threads):
        good = random_frames(20)
        floats = random_frames(6, dtype=np.float32)
        floats[2, 0, 0] = np.nan
        floats[4, 1, 1] = np.inf
        floats[5, 0, 0] = 0.5  # not storable losslessly as uint16
        truncated = tmp_path / "truncated.cxi"
        write_stacked_cxi(truncated, random_frames(50))
        with open(truncated, "r+b") as f:
            f.truncate(os.path.getsize(truncated) // 2)
        inputs = [
            write_stacked_cxi(tmp_path / "good.cxi", good),
            write_stacked_cxi(tmp_path / "floats.cxi", floats),
            write_stacked_cxi(tmp_path / "shape.cxi", random_frames(3, shape=(8, 8))),
            truncated,
            tmp_path / "missing.cxi",
        ]
        with h5py.File(tmp_path / "nodata.h5", "w") as h5:
            h5["something"] = 1
        inputs.append(tmp_path / "nodata.h5")
        path = tmp_path / "s.zarr"
        lines = []
        result = ingest(path, inputs, log=lines.append)
        rejects = store.read_attrs(path)["rejects"]
        reasons = {(os.path.basename(r["file"]), r["frame"]): r["reason"] for r in rejects}
        assert "NaN/inf" in reasons[("floats.cxi", 2)] and "NaN/inf" in reasons[("floats.cxi", 4)]
        assert "losslessly" in reasons[("floats.cxi", 5)]
        assert all("shape (8, 8)" in reasons[("shape.cxi", i)] for i in range(3))
        assert reasons[("missing.cxi", None)] == "no such file"
        assert "no frames found" in reasons[("nodata.h5", None)]
        assert any(name == "truncated.cxi" for name, _ in reasons)
        # every frame seen is either stored or rejected
        files = store.read_attrs(path)["ingested_files"]
        for record in files:
            assert record["frames"] == record["stored"] + record["rejected"]
        assert result["ingested"] == sum(f["stored"] for f in files)
        assert result["rejected"] == len(rejects)
        # One line per file and reason over consecutive frames: the wrong-shape file's
        # three frames share one; the float file's frames 2 and 4 (NaN) do not.
        assert all(line.startswith("ERROR: ") and "\n" not in line for line in lines)
        assert len(lines) == len(reject_lines(rejects)) < len(rejects)
        assert sum("shape.cxi: frames 0-2 (3 frames): shape (8, 8)" in line for line in lines) == 1
        assert sum("floats.cxi: frame " in line for line in lines) == 3
        ds = store.open_store(path)
        np.testing.assert_array_equal(ds.raw.values[:20], good)
        np.testing.assert_array_equal(ds.raw.values[20:23], floats[[0, 1, 3]].astype(np.uint16))

    def test_files_with_malformed_metadata_are_rejected_whole_and_the_others_ingested(self, tmp_path, dask_threads):
        """A group where the frames belong, a link to a missing file, text where a number
        belongs, frames without pixels: each file is rejected with its reason, no traceback."""
        good = random_frames(5)
        broken = {
            "group.cxi": lambda h5: h5.create_group("entry_1/data_1/data"),
            "link.cxi": lambda h5: h5.__setitem__("entry_1/data_1/data", h5py.ExternalLink(str(tmp_path / "gone.h5"), "/d")),
            "text.cxi": lambda h5: (h5.__setitem__("entry_1/data_1/data", random_frames(2)),
                                    h5.__setitem__("entry_1/instrument_1/detector_1/distance", "0.7 m")),
            "empty_frames.cxi": lambda h5: h5.__setitem__("entry_1/data_1/data", np.zeros((3, 0, 0), np.uint16)),
            "no_frames.cxi": lambda h5: h5.__setitem__("entry_1/data_1/data", np.zeros((0, 24, 32), np.uint16)),
        }
        for name, build in broken.items():
            with h5py.File(tmp_path / name, "w") as h5:
                build(h5)
        lines = []
        result = ingest(tmp_path / "s.zarr", [write_stacked_cxi(tmp_path / "good.cxi", good),
                                              *(tmp_path / name for name in broken)], log=lines.append)
        reasons = {os.path.basename(r["file"]): r["reason"] for r in store.read_attrs(tmp_path / "s.zarr")["rejects"]}
        assert result["ingested"] == 5 and set(reasons) == set(broken)
        assert "no frames found" in reasons["group.cxi"] and "no frames found" in reasons["link.cxi"]
        assert "unreadable metadata" in reasons["text.cxi"] and "0.7 m" in reasons["text.cxi"]
        assert "shape (0, 0)" in reasons["empty_frames.cxi"]
        assert reasons["no_frames.cxi"] == "holds no frames (an empty stack of (24, 32) frames)"
        np.testing.assert_array_equal(store.open_store(tmp_path / "s.zarr").raw.values, good)
        # --dataset names a group: said so.
        with pytest.raises(AirysortError, match="nothing to ingest"):
            ingest(tmp_path / "t.zarr", [tmp_path / "group.cxi"], dataset="/entry_1/data_1/data", log=lines.append)
        assert "dataset '/entry_1/data_1/data' is a group, not a dataset" in lines[-1]
        assert not (tmp_path / "t.zarr").exists()  # no lock-only directory left to look like a broken store

    def test_labels_other_than_zero_or_one_are_stored_as_unlabelled_with_a_warning(self, tmp_path, dask_threads):
        labels = random_labels(5).astype(np.float32)
        labels[0, 0], labels[1, :] = 1.9, 0.7  # an int8 cast would make these valid labels
        labels[2, 3], labels[3, 0] = np.nan, 257  # 257 wraps round to 1 in int8
        source = write_stacked_cxi(tmp_path / "a.cxi", random_frames(5))
        with h5py.File(source, "r+") as h5:
            h5["entry_1/result_1/labels"] = labels
        lines = []
        ingest(tmp_path / "s.zarr", [source], log=lines.append)
        stored = np.asarray(store.open_store(tmp_path / "s.zarr").label.values)
        assert (stored[:4] == -1).all() and (stored[4] == labels[4]).all()
        assert any(line.startswith("WARNING: ") and "4 frame(s) have labels other than 0 and 1 (frame 0, 1, 2, 3)"
                   in line for line in lines)

    def test_reject_lines_join_consecutive_frames_of_one_file_and_reason(self):
        rejects = [Reject("a.cxi", 0, "shape"), Reject("a.cxi", 1, "shape"), Reject("a.cxi", 2, "shape"),
                   Reject("a.cxi", 4, "shape"), Reject("a.cxi", 5, "NaN"), Reject("b.cxi", 6, "NaN"),
                   Reject("c.cxi", None, "no such file"), {"file": "d.cxi", "frame": 0, "reason": "x"},
                   {"file": "d.cxi", "frame": 1, "reason": "x"}]
        assert reject_lines(rejects) == [
            "a.cxi: frames 0-2 (3 frames): shape", "a.cxi: frame 4: shape", "a.cxi: frame 5: NaN",
            "b.cxi: frame 6: NaN", "c.cxi: whole file: no such file", "d.cxi: frames 0-1 (2 frames): x"]

    def test_entries_layout_missing_frames_are_rejected_and_frames_keep_their_entry_numbers(
            self, tmp_path, dask_threads):
        """entry_k is frame k - 1: an entry without its frame, or missing altogether, is a
        rejected frame (not a silent shift of every later one); a bad label is a warning."""
        frames, labels = random_frames(5), random_labels(5)
        cxi = write_entries_cxi(tmp_path / "gaps.cxi", frames, labels=labels)
        with h5py.File(cxi, "r+") as h5:
            del h5["entry_3/instrument_1/detector_1/data"]  # label and id, but no frame
            del h5["entry_4"]  # gone altogether
            del h5["entry_2/note_1/data"]
            h5["entry_2/note_1/data"] = np.ones(3, np.int8)  # a label of the wrong length
        lines = []
        result = ingest(tmp_path / "s.zarr", [cxi], log=lines.append)
        assert (result["ingested"], result["rejected"]) == (3, 2)
        ds = store.open_store(tmp_path / "s.zarr")
        np.testing.assert_array_equal(ds.frame.values, [0, 1, 4])
        np.testing.assert_array_equal(ds.raw.values, frames[[0, 1, 4]])
        assert ds.shot_id.values.tolist() == ["run7-shot00001", "run7-shot00002", "run7-shot00005"]
        np.testing.assert_array_equal(ds.label.values[[0, 2]], labels[[0, 4]])
        assert (ds.label.values[1] == -1).all()
        reasons = {r["frame"]: r["reason"] for r in store.read_attrs(tmp_path / "s.zarr")["rejects"]}
        assert set(reasons) == {2, 3} and "entry_3" in reasons[2] and "entry_4" in reasons[3]
        errors = [line for line in lines if line.startswith("ERROR: ")]
        assert len(errors) == 2 and all("gaps.cxi" in line and "frame" in line for line in errors)
        warning, = [line for line in lines if line.startswith("WARNING: ")]
        assert "frame 1 (entry_2)" in warning and "3 values" in warning
        record, = store.read_attrs(tmp_path / "s.zarr")["ingested_files"]
        assert record["frames"] == 5 == record["stored"] + record["rejected"]

    def test_repeated_shot_ids_are_warned_about_and_labelled_together(self, tmp_path, dask_threads):
        """Shot ids match label rows to patterns: when they repeat (the same file forced in
        twice), ingest warns, and a label row says how many patterns it labelled."""
        cxi = write_stacked_cxi(tmp_path / "a.cxi", random_frames(4))
        path = tmp_path / "s.zarr"
        lines = []
        ingest(path, [cxi], log=lines.append)
        assert not any(line.startswith("WARNING") for line in lines)
        ingest(path, [cxi], force=True, log=lines.append)
        warning, = [line for line in lines if line.startswith("WARNING")]
        assert "4 shot id(s)" in warning and "already in the store" in warning
        shot = str(store.open_store(path).shot_id.values[0])
        csv = tmp_path / "labels.csv"
        csv.write_text("shot_id," + ",".join(CLASS_NAMES) + "\n" + shot + "," + ",".join(["0"] * 10 + ["1"]) + "\n")
        result = runner.invoke(app, ["label", str(path), str(csv), "--json"])
        assert result.exit_code == 0 and json.loads(result.stdout.strip().splitlines()[-1])["labelled"] == 2
        assert f"shot_id {shot!r} is shared by 2 patterns" in result.stderr

    def test_nothing_stored_is_lost_by_a_bad_second_ingest(self, tmp_path, dask_threads):
        path = tmp_path / "s.zarr"
        frames = random_frames(10)
        ingest(path, [write_stacked_cxi(tmp_path / "a.cxi", frames)])
        ingest(path, [tmp_path / "missing.cxi"])
        np.testing.assert_array_equal(store.open_store(path).raw.values, frames)


class TestCommandLine:
    def test_ingest_and_info_json(self, tmp_path, dask_threads):
        cxi = write_stacked_cxi(tmp_path / "a.cxi", random_frames(12), labels=random_labels(12))
        store_path = str(tmp_path / "s.zarr")
        result = runner.invoke(app, ["ingest", store_path, str(cxi), str(tmp_path / "gone.cxi"), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout.strip().splitlines()[-1]) == {
            "ingested": 12, "rejected": 1, "skipped_files": 0, "patterns": 12}
        assert "gone.cxi: whole file: no such file" in result.stderr
        info = runner.invoke(app, ["info", store_path, "--json"])
        summary = json.loads(info.stdout.strip().splitlines()[-1])
        assert summary["patterns"] == 12 and summary["labelled"] == 12 and summary["rejected"] == 1
        assert summary["variables"]["raw"]["shards"] == [256, 24, 32]
        human = runner.invoke(app, ["info", store_path])
        assert "patterns   12 from 1 file(s); 1 rejected" in human.stderr
        # A script that passes --cluster to every command: the commands that need no
        # cluster take it too, and say so.
        for command in (["info", store_path], ["evaluate", store_path], ["label", store_path, str(tmp_path)]):
            result = runner.invoke(app, [*command, "--cluster", "slurm"])
            assert "No such option" not in result.output
            assert f"note: --cluster slurm is not used by {command[0]}, which " in result.stderr
        # Nothing stored and something rejected: exit status 1, the counts still printed.
        failed = runner.invoke(app, ["ingest", store_path, str(tmp_path / "typo.cxi"), "--json"])
        assert failed.exit_code == 1
        assert json.loads(failed.stdout.strip().splitlines()[-1])["rejected"] == 1
        assert runner.invoke(app, ["ingest", store_path, str(cxi)]).exit_code == 0  # skipped: not a failure

    def test_input_file_in_the_store_place_is_one_error_line(self, tmp_path):
        cxi = write_stacked_cxi(tmp_path / "a.cxi", random_frames(3))
        before = cxi.read_bytes()
        result = runner.invoke(app, ["ingest", str(cxi), str(tmp_path / "new.zarr"), "--cluster", "local-threads"])
        assert result.exit_code == 1
        assert result.stderr.startswith("ERROR: ") and "is a file, not a store" in result.stderr
        assert cxi.read_bytes() == before and not (tmp_path / "new.zarr").exists()

    def test_missing_store_error_line(self, tmp_path):
        result = runner.invoke(app, ["info", str(tmp_path / "none.zarr")])
        assert result.exit_code == 1
        assert result.stderr.strip().startswith("ERROR: store") and "does not exist" in result.stderr


def snapshot(path):
    """Everything an ingest writes, except its own id and timestamps."""
    group = zarr.open_group(path, mode="r", use_consolidated=False)
    arrays = {name: np.asarray(group[name][...]) for name in ("raw", "label", "mask", "frame", "pulse_energy", "pattern")}
    arrays["shot_id"] = np.asarray(group["shot_id"][...]).astype(object)
    arrays["source_file"] = np.asarray(group["source_file"][...]).astype(object)
    attrs = dict(group.attrs)
    files = [{k: v for k, v in f.items() if k != "ingest_id"} for f in attrs["ingested_files"]]
    rejects = [{k: v for k, v in r.items() if k != "ingest_id"} for r in attrs["rejects"]]
    return arrays, files, rejects


def run_ingest(store_path, inputs):
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "ingest", str(store_path), *map(str, inputs), "--cluster", "local-threads"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=repo_env(),
    )


@pytest.mark.slow
def test_sigkill_at_any_point_then_rerun_gives_identical_store(tmp_path):
    """Kill a real ingest process at several points; the rerun must finish the same store."""
    inputs = [write_stacked_cxi(tmp_path / f"run{i}.cxi", random_frames(700, shape=(64, 64), seed=i),
                                labels=random_labels(700, seed=i)) for i in range(3)]
    bad = random_frames(4, dtype=np.float32)
    bad[1, 0, 0] = np.nan
    inputs.append(write_stacked_cxi(tmp_path / "bad.cxi", bad))

    reference = tmp_path / "reference.zarr"
    assert run_ingest(reference, inputs).wait() == 0
    expected = snapshot(reference)

    killed_with_journal = 0
    # "journal": right when the plan is journaled; "revised": right when the bad frames
    # found while writing have been dropped from it (the second, partial pass).
    marks = {"creating": store.STAGING_DIR, "journal": store.PENDING_DIR,
             "revised": f"{store.PENDING_DIR}/plan-1.npz"}
    for delay in (0.3, 1.5, 2.5, "creating", "journal", "revised", 4.0):
        path = tmp_path / f"killed-{delay}.zarr"
        process = run_ingest(path, inputs)
        if delay in marks:
            deadline = time.time() + 60
            while not (path / marks[delay]).exists() and time.time() < deadline and process.poll() is None:
                time.sleep(0.002)
        else:
            time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_with_journal += (path / store.PENDING_DIR).exists()
        rerun = run_ingest(path, inputs)
        assert rerun.wait() == 0, rerun.stderr.read().decode()
        assert not (path / store.PENDING_DIR).exists()
        got = snapshot(path)
        for name, array in expected[0].items():
            np.testing.assert_array_equal(got[0][name], array, err_msg=f"{name} after kill at {delay}")
        assert got[1] == expected[1] and got[2] == expected[2]
    assert killed_with_journal >= 1, "no kill landed while frames were being written"


# zarr names a file of its own in a store's directory (the user's notes.txt) when it lists it.
@pytest.mark.filterwarnings("ignore:Object at notes.txt is not recognized")
def test_a_store_killed_while_being_created_is_created_again(tmp_path, dask_threads):
    """What a kill during store creation leaves (a half-built store aside, and some of its
    arrays already moved in, but no root metadata) is no store: the next ingest builds the
    same store as an uninterrupted one, and other files in the directory stay."""
    inputs = [write_stacked_cxi(tmp_path / "run.cxi", random_frames(40, shape=(16, 16)), labels=random_labels(40))]
    reference = tmp_path / "reference.zarr"
    ingest(reference, inputs, log=lambda line: None)

    scratch = tmp_path / "scratch.zarr"
    store.create_store(scratch, frame_shape=(16, 16), dtype=np.uint16)
    path = tmp_path / "killed.zarr"
    (path / store.STAGING_DIR).mkdir(parents=True)
    (path / store.STAGING_DIR / "zarr.json").write_text("{}")
    for name in ("raw", "mask", "shot_id"):
        (scratch / name).rename(path / name)
    (path / "notes.txt").write_text("the user's own file")
    assert not store.is_store(path)

    ingest(path, inputs, log=lambda line: None)
    got, expected = snapshot(path), snapshot(reference)
    for name, array in expected[0].items():
        np.testing.assert_array_equal(got[0][name], array, err_msg=name)
    assert got[1:] == expected[1:]
    assert not (path / store.STAGING_DIR).exists()
    assert (path / "notes.txt").read_text() == "the user's own file"


def test_another_programs_zarr_store_is_refused_in_one_line_and_left_alone(tmp_path):
    other = tmp_path / "other.zarr"
    zarr.open_group(other, mode="w").create_array("x", data=np.arange(5))
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    cxi = write_stacked_cxi(tmp_path / "a.cxi", random_frames(5, shape=(16, 16)))
    for command in (["ingest", str(other), str(cxi), "--cluster", "local-threads"], ["info", str(other)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1, result.output
        assert "is a Zarr store, but not one airysort made" in result.output
        assert "Traceback" not in result.output
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before  # no lock file either
