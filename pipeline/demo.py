"""The whole pipeline on a simulated beamtime, as a physicist would run it.

``airysort demo`` (and ``make demo``) simulates a small labelled beamtime, ingests it,
preprocesses and correlates it, hands 20 % of the simulator's truth to ``airysort label``
as a stand-in researcher, trains the CNN and predicts the rest, trains the β-TCVAE, embeds
and clusters (GMM on latents, spectral on images), evaluates against the full truth,
explains a few patterns with Grad-CAM++, sorts, and writes the report. Each step calls the
same Python function as its command, so the demo is also a worked example of the API.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.labelsheet import write_label_csv

#: Defaults sized so that the demo finishes in well under 15 minutes on 2 CPU cores.
DEMO_PATTERNS = 2000
DEMO_SIZE = 128
DEMO_LABELLED = 0.2


def run_demo(
    out_dir: str | os.PathLike = "demo-output",
    *,
    n: int = DEMO_PATTERNS,
    size: int = DEMO_SIZE,
    labelled_fraction: float = DEMO_LABELLED,
    cnn_epochs: int = 12,
    vae_epochs: int = 10,
    seed: int = 0,
    cluster: str = "local",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every stage on a simulated beamtime; return a summary with the report's path.

    Parameters
    ----------
    out_dir : path-like
        Everything goes here (replaced): the CXI file, ``beamtime.zarr``, the models,
        galleries and ``report/report.html``.
    n, size : int
        Simulated patterns and their side in pixels.
    labelled_fraction : float
        Share of patterns whose simulator truth the stand-in researcher labels.
    cnn_epochs, vae_epochs : int
        Training epochs.
    """
    from pipeline import store
    from pipeline.classify import explain_patterns, import_labels, predict_store, train_classifier
    from pipeline.cluster import cluster_store
    from pipeline.correlate import correlate_store
    from pipeline.dask_cluster import dask_client
    from pipeline.embed import embed_store, latent_figures, train_vae
    from pipeline.evaluate import evaluate_store
    from pipeline.ingest import ingest
    from pipeline.preprocess import preprocess_store
    from pipeline.report import write_report
    from pipeline.simulate import simulate_beamtime
    from pipeline.sort import sort_store

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cxi, store_path = out / "beamtime.cxi", out / "beamtime.zarr"
    report_dir = out / "report"
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def step(name: str, function: Callable[[], Any]) -> Any:
        log(f"== {name}")
        t = time.perf_counter()
        result = function()
        timings[name] = round(time.perf_counter() - t, 1)
        return result

    with dask_client(cluster) as client:
        step("simulate", lambda: simulate_beamtime(cxi, n, size=size, seed=seed, profile="fermi", client=client))
        step("ingest", lambda: ingest(store_path, [cxi], client=client, log=log))
        step("preprocess", lambda: preprocess_store(store_path, size=min(size, 128)))
        step("correlate", lambda: correlate_store(store_path))

        # The stand-in researcher: the simulator's truth becomes the evaluation truth, and
        # only a random 20 % of it is given to the classifier as labels.
        dataset = store.open_store(store_path)
        shot_ids = np.asarray(dataset["shot_id"].values).astype(object)
        truth = np.asarray(dataset["label"].values)
        truth_csv = write_label_csv(out / "truth.csv", shot_ids, truth)
        chosen = np.sort(np.random.default_rng(seed).choice(len(truth), int(labelled_fraction * len(truth)), replace=False))
        store.write_pattern_variable_direct(store_path, "label", np.full_like(truth, -1))
        labels_csv = write_label_csv(out / "researcher_labels.csv", shot_ids[chosen], truth[chosen])
        step("label", lambda: import_labels(store_path, labels_csv))

        cnn_dir, vae_dir = out / "models" / "cnn", out / "models" / "vae"
        step("train cnn", lambda: train_classifier(store_path, cnn_dir, epochs=cnn_epochs, log=log))
        step("predict", lambda: predict_store(store_path, cnn_dir))
        step("train vae", lambda: train_vae(store_path, vae_dir, epochs=vae_epochs, log=log))
        step("embed", lambda: embed_store(store_path, vae_dir))
        step("cluster gmm", lambda: cluster_store(store_path, method="gmm", seed=seed))
        step("cluster spectral", lambda: cluster_store(store_path, method="spectral", seed=seed))
        evaluation = step("evaluate", lambda: evaluate_store(store_path, truth_csv=truth_csv))
        unlabelled = np.setdiff1d(np.arange(len(truth)), chosen)
        examples = [int(i) for i in np.random.default_rng(seed + 1).choice(unlabelled, 4, replace=False)]
        step("explain", lambda: explain_patterns(store_path, cnn_dir, indices=examples, out_dir=report_dir / "explain"))
        step("latent figures", lambda: latent_figures(store_path, vae_dir, report_dir / "latent"))
        step("sort", lambda: sort_store(store_path, out / "sorted"))
        report = step("report", lambda: write_report(store_path, report_dir, truth_csv=truth_csv, title="airysort demo: simulated helium-droplet beamtime"))

    summary = {
        "report": report["report"],
        "store": str(store_path),
        "patterns": int(len(truth)),
        "labelled": int(len(chosen)),
        "seconds": round(time.perf_counter() - started, 1),
        "timings": timings,
        "micro_f1": evaluation.get("classification", {}).get("micro_f1"),
        "macro_f1": evaluation.get("classification", {}).get("macro_f1"),
        "clustering": evaluation.get("clustering", {}),
    }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The table ``airysort demo`` prints at the end."""
    lines = [f"demo: {summary['patterns']} simulated patterns, {summary['labelled']} labelled, {summary['seconds']:.0f} s"]
    lines += [f"  {name:<18} {seconds:>7.1f} s" for name, seconds in summary["timings"].items()]
    if summary.get("micro_f1") is not None:
        lines.append(f"classification on the unlabelled rest: micro F1 {summary['micro_f1']:.3f}, macro F1 {summary['macro_f1']:.3f}")
    for method, scores in summary["clustering"].items():
        lines.append(
            f"clustering {method:<9} k={scores['k']:<3} homogeneity {scores['homogeneity']:.3f}  "
            f"completeness {scores['completeness']:.3f}  ARI {scores['ari']:.3f}  NMI {scores['nmi']:.3f}"
        )
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)
