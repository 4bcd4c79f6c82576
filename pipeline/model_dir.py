"""A trained model's directory: ``model.json`` (kind, config, thresholds, history) beside
its orbax checkpoints. Shared by the classifier and the β-TCVAE wiring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    info = json.loads(path.read_text())
    if info.get("model") != kind:
        raise AirysortError(f"{str(model_dir)!r} holds a {info.get('model')!r} model, not {KIND_NAMES[kind]}; {train}")
    return info
