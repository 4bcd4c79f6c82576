"""One self-contained HTML report of a store: every figure embedded as a PNG data URI.

Sections (each present when the store or the given directories hold its inputs): store
summary, class distribution, per-class metrics and confusion matrices, Grad-CAM++
examples, the clustering table (GMM on VAE latents vs spectral on images), latent-space
map and traversals, cluster galleries, benchmark results, provenance.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__, store
from pipeline.errors import AirysortError
from pipeline.gallery import contact_sheet, display_images
from pipeline.info import store_info
from pipeline.taxonomy import CLASS_NAMES

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; margin: 4px 0; } .note { color: #666; font-size: 0.9em; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; } figcaption { font-size: 0.85em; }
"""


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_uri(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return _png_uri(buffer.getvalue())


def _img(uri: str, alt: str, caption: str | None = None) -> str:
    tag = f'<img src="{uri}" alt="{html.escape(alt)}">'
    return f"<figure>{tag}<figcaption>{html.escape(caption)}</figcaption></figure>" if caption else tag


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f'<td class="num">{value:.3f}</td>'
        if isinstance(value, (int, np.integer)):
            return f'<td class="num">{value}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pngs(directory: Path | None) -> list[Path]:
    if directory is None or not Path(directory).is_dir():
        return []
    return sorted(Path(directory).rglob("*.png"))


# --------------------------------------------------------------------------- sections


def section_summary(info: dict[str, Any]) -> str:
    rows = [["patterns", info["patterns"]], ["input files", info["files"]], ["rejected frames", info["rejected"]]]
    if "labelled" in info:
        rows.append(["labelled by the researcher", info["labelled"]])
    if "hit_rate" in info:
        rows.append(["hit rate", f"{info['hit_rate']:.1%}"])
    for key, value in info["geometry"].items():
        rows.append([f"{key} [m]", "unknown" if value is None else f"{value:.4g}"])
    variables = [[n, " × ".join(v["dims"]), " × ".join(map(str, v["shape"])), v["dtype"]] for n, v in info["variables"].items()]
    rejects = ""
    if info["rejects"]:
        rejects = "<h3>Rejected input</h3>" + _table(
            ["file", "frame", "reason"], [[r["file"], "whole file" if r["frame"] is None else r["frame"], r["reason"]] for r in info["rejects"]]
        )
    return "<h2>Store</h2>" + _table(["", "value"], rows) + "<h3>Variables</h3>" + _table(["name", "dims", "shape", "dtype"], variables) + rejects


def section_classes(dataset) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    if "predicted" in dataset:
        series["predicted"] = np.asarray(dataset["predicted"].values).sum(axis=0)
    if "label" in dataset:
        labels = np.asarray(dataset["label"].values)
        known = (labels >= 0).all(axis=1)
        if known.any():
            series["labelled"] = labels[known].sum(axis=0)
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(9, 3.2))
    width = 0.8 / len(series)
    for i, (name, counts) in enumerate(series.items()):
        axis.bar(np.arange(len(CLASS_NAMES)) + i * width, counts, width, label=name)
    axis.set_xticks(np.arange(len(CLASS_NAMES)) + 0.4 - width / 2, CLASS_NAMES, rotation=30, ha="right")
    axis.set_ylabel("patterns")
    axis.set_yscale("log")
    axis.legend()
    rows = [[name, *[int(series[s][c]) for s in series]] for c, name in enumerate(CLASS_NAMES)]
    return "<h2>Class distribution</h2>" + _img(_figure_uri(figure), "class distribution") + _table(["class", *series], rows)


#: How evaluate chose the scored patterns, in words.
SCORED_WORDS = {"held_out": "held out from training", "all_labelled": "all labelled, training patterns included"}


def section_metrics(dataset, evaluation: dict[str, Any] | None, truth_csv: str | os.PathLike | None = None) -> str | None:
    if evaluation and "classification_not_scored" in evaluation:
        return f"<h2>Classification</h2><p class='note'>Not scored: {html.escape(evaluation['classification_not_scored'])}.</p>"
    if not evaluation or "classification" not in evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, multilabel_confusion_matrix

    from pipeline.evaluate import read_truth_csv, training_patterns

    result = evaluation["classification"]
    rows = [[name, m["precision"], m["recall"], m["f1"], m["support"]] for name, m in result["per_class"].items()]
    text = (
        f"<h2>Classification</h2><p>Scored on {result['n']} patterns "
        f"({SCORED_WORDS.get(result.get('scored'), html.escape(str(result.get('scored', ''))))}; "
        f"truth: {html.escape(str(evaluation.get('truth')))}). "
        f"Micro F1 <b>{result['micro_f1']:.3f}</b>, macro F1 <b>{result['macro_f1']:.3f}</b>"
        f" (over the {len(result['macro_classes'])} classes in the truth or "
        "the predictions).</p>"
        + _table(["class", "precision", "recall", "F1", "support"], rows)
    )
    if result.get("note"):
        text += f"<p class='note'>Note: {html.escape(result['note'])}</p>"
    # the same patterns evaluate scored: held-out ones when the training set is known
    if truth_csv is not None:
        truth, _, _ = read_truth_csv(truth_csv, dataset["shot_id"].values)
    else:
        truth = np.asarray(dataset["label"].values)
    trained, _ = training_patterns(dataset, external_truth=truth_csv is not None)
    known = (truth >= 0).all(axis=1)
    scored = (known if trained is None else known & ~trained) & store.covered(dataset, "predicted")
    if scored.any():
        matrices = multilabel_confusion_matrix(truth[scored], np.asarray(dataset["predicted"].values)[scored])
        figure, axes = plt.subplots(2, 6, figsize=(13, 4.6))
        for axis, name, matrix in zip(axes.flat, CLASS_NAMES, matrices):
            # scikit-learn's display writes each count in white on dark cells, black on light ones.
            ConfusionMatrixDisplay(matrix, display_labels=["0", "1"]).plot(
                ax=axis, cmap="Blues", colorbar=False, text_kw={"fontsize": 8})
            axis.set_title(name, fontsize=8)
            axis.set_xlabel("predicted", fontsize=7)
            axis.set_ylabel("true", fontsize=7)
            axis.tick_params(labelsize=7)
        axes.flat[-1].set_axis_off()
        figure.tight_layout()
        text += "<h3>Confusion matrices (one per class)</h3>" + _img(_figure_uri(figure), "confusion matrices")
    return text


def section_gradcam(explain_dir: Path | None) -> str | None:
    images = _pngs(explain_dir)[:24]
    if not images:
        return None
    figures = "".join(_img(_png_uri(p.read_bytes()), p.stem, p.stem) for p in images)
    return "<h2>Grad-CAM++: where the network looked</h2>" + figures


def section_clustering(evaluation: dict[str, Any] | None) -> str | None:
    if not evaluation or "clustering" not in evaluation:
        return None
    names = {"gmm": "GMM on β-TCVAE latents", "spectral": "spectral clustering on images (baseline)"}
    rows = [[names.get(m, m), s["k"], s["homogeneity"], s["completeness"], s["ari"], s["nmi"]] for m, s in evaluation["clustering"].items()]
    if "classification" in evaluation:
        s = evaluation["classification"]["groups"]
        rows.append([f"the classifier's predicted groups (supervised reference, {s['n']} scored patterns)",
                     s["k"], s["homogeneity"], s["completeness"], s["ari"], s["nmi"]])
    groups = evaluation.get("coarse_groups", {})
    note = ", ".join(f"{g}: {n}" for g, n in groups.items())
    return (
        "<h2>Unsupervised sorting</h2><p>Scored against each pattern's coarse group "
        f"(empty, double, prolate, elliptical, round, other){': ' + html.escape(note) if note else ''}.</p>"
        + _table(["method", "k", "homogeneity", "completeness", "adjusted Rand", "NMI"], rows)
    )


def section_latent(latent_dir: Path | None) -> str | None:
    images = _pngs(latent_dir)
    if not images:
        return None
    return "<h2>Latent space</h2>" + "".join(_img(_png_uri(p.read_bytes()), p.stem, p.stem) for p in images)


def section_cluster_galleries(dataset) -> str | None:
    parts = []
    for variable in sorted(v for v in dataset.data_vars if str(v).startswith("cluster_") and dataset[v].dims == ("pattern",)):
        assignment = np.asarray(dataset[variable].values)
        for k in np.unique(assignment[assignment >= 0]):
            members = np.flatnonzero(assignment == k)
            picks = np.random.default_rng(int(k)).choice(members, size=min(8, len(members)), replace=False)
            buffer = io.BytesIO()
            contact_sheet(display_images(dataset, np.sort(picks)), buffer, captions=[f"#{p}" for p in np.sort(picks)],
                          title=f"{variable.removeprefix('cluster_')} cluster {k}: {len(members)} patterns", columns=8, tile_inches=1.2)
            parts.append(_img(_png_uri(buffer.getvalue()), f"{variable} {k}"))
    return "<h2>Cluster galleries</h2>" + "".join(parts) if parts else None


def section_benchmarks(benchmark_dir: Path | None) -> str | None:
    if benchmark_dir is None or not Path(benchmark_dir).is_dir():
        return None
    parts = [_img(_png_uri(p.read_bytes()), p.stem, p.stem) for p in _pngs(benchmark_dir)]
    for text_file in sorted(Path(benchmark_dir).glob("*.txt")):
        parts.append(f"<h3>{html.escape(text_file.stem)}</h3><pre>{html.escape(text_file.read_text())}</pre>")
    return "<h2>Benchmarks</h2>" + "".join(parts) if parts else None


def section_provenance(info: dict[str, Any]) -> str:
    def shortened(text: str, limit: int = 300) -> str:  # the full record: airysort info --json
        return text if len(text) <= limit else text[:limit] + " …"

    rows = [[p.get("time", ""), p.get("command", ""), p.get("version", ""),
             shortened(json.dumps(p.get("parameters", {})))] for p in info["provenance"]]
    return "<h2>Provenance</h2>" + _table(["time (UTC)", "command", "version", "parameters"], rows)


# --------------------------------------------------------------------------- public API


def write_report(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    explain_dir: str | os.PathLike | None = None,
    latent_dir: str | os.PathLike | None = None,
    benchmark_dir: str | os.PathLike | None = None,
    truth_csv: str | os.PathLike | None = None,
    title: str = "airysort report",
) -> dict[str, Any]:
    """Write ``OUT_DIR/report.html`` for the store at ``path``.

    Parameters
    ----------
    path : path-like
        The store.
    out_dir : path-like
        Output directory (created). Figure directories default to ``OUT_DIR/explain``,
        ``OUT_DIR/latent`` and ``OUT_DIR/benchmarks`` when those exist.
    explain_dir, latent_dir, benchmark_dir : path-like, optional
        PNGs from ``airysort explain`` / ``airysort latent`` and benchmark results.
    truth_csv : path-like, optional
        Label CSV to score against (as ``evaluate --truth``); the patterns labelled in the
        store, which trained the classifier, are then left out of the scores.

    Returns
    -------
    dict
        ``report`` (path of the HTML file) and ``sections`` (titles included).
    """
    from pipeline.evaluate import evaluate_store

    for name, given in (("--explain-dir", explain_dir), ("--latent-dir", latent_dir),
                        ("--benchmark-dir", benchmark_dir)):
        if given is not None and not Path(given).is_dir():
            raise AirysortError(f"{name} {str(given)!r} is not a directory")
    out = store.check_output_dir(out_dir, path)
    out.mkdir(parents=True, exist_ok=True)
    dataset = store.open_store(path)
    info = store_info(path)
    if truth_csv is not None:  # asked for: what keeps it from scoring is the user's to know
        evaluation = evaluate_store(path, truth_csv=truth_csv)
    else:
        try:
            evaluation = evaluate_store(path)
        except AirysortError:
            evaluation = None  # nothing to score yet (no predictions/clusters or no labels)

    def default(given, name):
        return Path(given) if given is not None else (out / name if (out / name).is_dir() else None)

    sections = {
        "Store": section_summary(info),
        "Class distribution": section_classes(dataset),
        "Classification": section_metrics(dataset, evaluation, truth_csv),
        "Grad-CAM++": section_gradcam(default(explain_dir, "explain")),
        "Unsupervised sorting": section_clustering(evaluation),
        "Latent space": section_latent(default(latent_dir, "latent")),
        "Cluster galleries": section_cluster_galleries(dataset),
        "Benchmarks": section_benchmarks(default(benchmark_dir, "benchmarks")),
        "Provenance": section_provenance(info),
    }
    present = {k: v for k, v in sections.items() if v}
    body = "".join(present.values())
    document = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='note'>Store {html.escape(str(Path(path).resolve()))}; airysort {__version__}.</p>{body}</body></html>"
    )
    report = out / "report.html"
    report.write_text(document, encoding="utf-8")
    return {"report": str(report), "sections": list(present)}
