"""Simulated single-shot diffraction of helium nanodroplets with ground-truth labels.

Public API
----------
simulate_beamtime(path, n, *, size, seed, profile, like, layout, balanced, client)
    Write a labelled beamtime as a CXI file (``airysort simulate``).
simulate_patterns(n, *, seed, profile, size, balanced)
    Frames, labels and metadata in memory.
load_profile(name_or_path)
    A shipped experiment profile (``"fermi"``, ``"lcls"``) or a YAML file.

Physics lives in :mod:`.forward` (projection, Born and MSFT kernels),
:mod:`.particles` (shapes), :mod:`.optics` (Henke optical constants),
:mod:`.detector` (detector and source effects), :mod:`.labels` (label rules) and
:mod:`.scene` (what is in the focus); :mod:`.beamtime` wires them over Dask and
writes CXI. See ``docs/simulator.md``.
"""

from __future__ import annotations

from pipeline.simulate.beamtime import simulate_beamtime, simulate_patterns
from pipeline.simulate.profile import PROFILE_NAMES, Profile, load_profile

__all__ = ["PROFILE_NAMES", "Profile", "load_profile", "simulate_beamtime", "simulate_patterns"]
