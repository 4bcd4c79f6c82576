"""A trained model's directory: ``model.json`` (kind, config, thresholds, history) beside
its orbax checkpoints. Shared by the classifier and the β-TCVAE wiring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.errors import AirysortError

MODEL_FILE = "model.json"
KIND_NAMES = {"cnn": "a classifier", "vae": "a β-TCVAE"}


def read_model_info(model_dir: str | Path, *, kind: str) -> dict[str, Any]:
    """``model.json`` of a model directory of ``kind`` ("cnn" or "vae").

    Raises AirysortError, saying how to train one, when the directory holds no model or
    a model of another kind.
    """
    path = Path(model_dir) / MODEL_FILE
    train = f"train one with 'airysort train STORE MODEL_DIR --model {kind}'"
    if not path.exists():
        raise AirysortError(f"{str(model_dir)!r} holds no trained model ({MODEL_FILE} missing); {train}")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AirysortError(f"{str(path)!r} is damaged ({error}); copy the model directory again, or "
                            f"train with --fresh") from None
    if not isinstance(info, dict) or info.get("model") != kind:
        kind_found = info.get("model") if isinstance(info, dict) else None
        raise AirysortError(f"{str(model_dir)!r} holds a {kind_found!r} model, not {KIND_NAMES[kind]}; {train}")
    return info


def trained_weights(model_dir: str | Path) -> Path:
    """``best/``, the trained weights of a model directory, or an AirysortError saying why
    there are none. Checked before a command writes anything: the weights are otherwise
    first read inside the Dask tasks, after the store's old results were marked as being
    replaced."""
    best = Path(model_dir) / "best"
    if not best.is_dir() or not any(best.iterdir()):
        raise AirysortError(
            f"{str(model_dir)!r} has no trained weights ({best.name}/ missing or empty): training was "
            "interrupted before its first epoch ended (run 'airysort train' again to resume), or the "
            "directory was copied in part (copy all of it)")
    return best


def write_model_info(model_dir: Path, info: dict[str, Any]) -> None:
    """Write ``model.json``: to a temporary file, then renamed, so that a crash never
    leaves a half-written one. Under ``srun`` every task holds the same info; only the
    first process writes it."""
    import jax

    if jax.process_index() != 0:
        return
    tmp = Path(model_dir) / (MODEL_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=float))
    tmp.replace(Path(model_dir) / MODEL_FILE)


#: ``preprocess`` parameters that change what an ``image`` looks like beyond its shape,
#: with the values of stores preprocessed before a parameter existed. A model learns
#: one look; images made another way (a different crop is a different zoom) would be
#: classified without warning, so the look is recorded with the model and checked.
IMAGE_PREPROCESSING = {"crop": 1.0, "scaling": "log", "asinh_scale": 1.0}


#: What makes a ``ccf`` look as it does (``airysort correlate``'s options): the ring radii
#: are compared within :data:`RING_TOLERANCE`, since their defaults follow each store's
#: hole and refined centres.
CCF_PREPROCESSING = {"n_q": 64, "n_phi": 128, "variant": "auto", "r_min": None, "r_max": None}
RING_TOLERANCE = {"rtol": 0.1, "atol": 2.0}  # pixels


def trained_precision(info: Mapping[str, Any]):
    """A context in which a model computes as it was trained (``TrainConfig.precision``, float32
    for models saved before it existed): its thresholds were tuned so, and on an NVIDIA GPU
    JAX's default would otherwise round products to TensorFloat-32."""
    import jax

    return jax.default_matmul_precision((info.get("train") or {}).get("precision", "highest"))


def input_preprocessing(attrs: Mapping[str, Any], input: str) -> dict[str, Any]:
    """The parameters behind a store's ``input`` (store attributes ``attrs``): those of
    :data:`IMAGE_PREPROCESSING` for ``image``, of :data:`CCF_PREPROCESSING` for ``ccf``."""
    from pipeline.store import last_parameters

    if input == "ccf":
        done = last_parameters(attrs, "correlate")
        return {name: done.get(name, default) for name, default in CCF_PREPROCESSING.items()}
    if input != "image":
        return {}
    done = last_parameters(attrs, "preprocess")
    return {name: done.get(name, default) for name, default in IMAGE_PREPROCESSING.items()}


def _same(name: str, expected: Any, found: Any) -> bool:
    if name in ("r_min", "r_max") and expected is not None and found is not None:
        return bool(np.isclose(found, expected, **RING_TOLERANCE))
    return found == expected


def check_preprocessing(info: Mapping[str, Any], attrs: Mapping[str, Any], *, input: str, store_path, model_dir) -> None:
    """Refuse a store whose ``input`` was preprocessed unlike the model's training data.

    ``info`` is the model's ``model.json``; models saved before the preprocessing was
    recorded (no ``preprocessing`` entry) are not checked.
    """
    expected = info.get("preprocessing")
    if not expected:
        return
    found = input_preprocessing(attrs, input)
    differ = [name for name, value in expected.items() if not _same(name, value, found.get(name))]
    if differ:
        wanted = " ".join(f"--{name.replace('_', '-')} {expected[name]}" for name in differ)
        got = ", ".join(f"{name} {found.get(name)!r}" for name in differ)
        command = "correlate" if input == "ccf" else "preprocess"
        wanted = wanted.replace("--variant cross", "--cross-q").replace("--variant auto", "")
        raise AirysortError(
            f"{input!r} of {str(store_path)!r} was preprocessed with {got}, but the model in "
            f"{str(model_dir)!r} was trained on inputs made with {wanted.strip()}; run "
            f"'airysort {command} {store_path} {wanted.strip()}' first"
        )
