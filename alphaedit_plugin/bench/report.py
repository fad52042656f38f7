"""Results of a benchmark run: ``results.json``, ``results.md`` (one row per method) and PNG plots.

Plots (matplotlib, optional: without it the run logs a warning and writes no PNG):

- ``plot_<metric>.png``: the metric against the number of edits, one line per method
  (points at 0 edits, the unedited model, shared by all methods; after every ``eval_every``
  batches; and after the last);
- ``plot_perplexity.png``: held-out perplexity (``--perplexity``) and ``plot_null_space_left.png``: the
  null-space directions the edits have left, summed over the edited layers (``--null-space-curve``);
- ``general_<task>.png``: general-capability F1 (likelihood) against edits, also from 0 edits;
- ``representation.png``: the 2-D projection of hidden states before and after each method.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

logger = logging.getLogger(__name__)

LABELS = {"efficacy": "Efficacy", "generalization": "Generalization", "specificity": "Specificity",
          "fluency": "Fluency", "consistency": "Consistency", "edit_succ": "Edit Succ.", "portability": "Portability",
          "locality": "Locality", "multihop_accuracy": "Multi-hop", "multihop_cot_accuracy": "Multi-hop (CoT)",
          "new_single_hop_accuracy": "Single-hop (new)", "edit_mention": "Edit mention", "old_mention": "Old mention",
          "subject_fact_recall": "Subject facts", "related_fact_recall": "Related facts"}


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def markdown_table(results: Dict[str, Any]) -> str:
    headline = [m for m in results["headline"]
                if any(isinstance(r["final"].get(m), (int, float)) for r in results["methods"].values())
                or isinstance(results["pre"].get(m), (int, float))]
    tasks = sorted((results.get("general_pre") or {}).keys())
    preserved = any(r.get("preservation") for r in results["methods"].values())
    perplexity = isinstance(results.get("perplexity_pre"), (int, float))
    head = ["Method", "Edits"] + [LABELS.get(m, m) for m in headline] + [f"{t} F1" for t in tasks] + ["s/edit"]
    head += ["Held-out ppl"] if perplexity else []
    head += ["‖ΔW·K0‖/‖W·K0‖"] if preserved else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pre_general = results.get("general_pre") or {}
    lines.append("| " + " | ".join(["(before editing)", "0"] + [_fmt(results["pre"].get(m)) for m in headline]
                                   + [_fmt(100 * pre_general[t]["f1_new"]) for t in tasks] + [""]
                                   + ([_fmt(results["perplexity_pre"])] if perplexity else [])
                                   + (["0"] if preserved else [])) + " |")
    for name, r in results["methods"].items():
        general = r.get("general") or {}
        cells = [name, str(r["edits"])] + [_fmt(r["final"].get(m)) for m in headline]
        cells += [_fmt(100 * general[t]["f1_new"]) if t in general else "n/a" for t in tasks]
        cells.append(_fmt(r.get("seconds_per_edit")))
        if perplexity:
            cells.append(_fmt(r.get("perplexity")))
        if preserved:
            values = list((r.get("preservation") or {}).values())
            cells.append(f"{sum(values) / len(values):.3f}" if values else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    protocol = results["protocol"]
    text = [f"**{results['dataset']['family']}** ({results['dataset']['schema']}, `{results['dataset']['path']}`), "
            f"model `{results['model']}`: {protocol['edits']} cases edited in {protocol['batches']} sequential batches "
            f"of {protocol['batch_size']}, scored after the last batch (seed {protocol['seed']}).", ""] + lines
    if preserved:
        text += ["", "‖ΔW·K0‖/‖W·K0‖: how much the whole accumulated update moves the edited layers' outputs on "
                     "held-out corpus keys, mean over the edited layers (`results.json` has each layer); lower "
                     "preserves more."]
    if tasks:
        text += ["", "General-capability columns: weighted F1 ×100 of the likelihood-scored answers (`f1_new`); "
                     "`results.json` holds the generation-scored F1, MCC and counts too."]
    if results.get("pre_host"):
        text += ["", "Scored by EasyEdit's own evaluators (`--host-evaluators`: the KnowEdit script's inputs, first "
                     "alias only, left-padded batches per kind; docs/evaluation.md):", ""]
        text += _host_table(results, headline)
    text += curve_table(results, headline)
    notes = sorted({n for r in results["methods"].values() for n in r["final"].get("notes", [])})
    if notes:
        text += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(text) + "\n"


def null_space_left(point: Dict[str, Any]) -> Optional[tuple]:
    """``(directions left, null-space directions)`` summed over a point's edited layers, or None."""
    layers = (point.get("null_space") or {}).values()
    return (sum(v["left"] for v in layers), sum(v["null_space"] for v in layers)) if layers else None


def curve_table(results: Dict[str, Any], headline: List[str]) -> List[str]:
    """Every curve point of every method (none where no method has a point between 0 edits and the last)."""
    points = [p for r in results["methods"].values() for p in r["curve"]]
    if not any(0 < p["edits"] < r["edits"] for r in results["methods"].values() for p in r["curve"]):
        return []
    perplexity = any(isinstance(p.get("perplexity"), (int, float)) for p in points)
    capacity = any(p.get("null_space") for p in points)
    head = ["Method", "Edits", "Scored"] + [LABELS.get(m, m) for m in headline]
    head += ["Held-out ppl"] if perplexity else []
    head += ["Null space left"] if capacity else []
    lines = ["", "Curves (each point scores the cases edited so far, or the `Scored` sample of them spread evenly "
                 "over them; 0 edits: the unedited model on every case to be edited):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["methods"].items():
        for p in r["curve"]:
            scored = p.get("scored_cases", p["edits"] if p["edits"] else results["protocol"]["edits"])
            cells = [name, str(p["edits"]), str(scored)] + [_fmt(p["metrics"].get(m)) for m in headline]
            if perplexity:
                cells.append(_fmt(p.get("perplexity")))
            if capacity:
                left = null_space_left(p)
                cells.append(f"{left[0]} / {left[1]}" if left else "")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _host_table(results: Dict[str, Any], headline: List[str]) -> List[str]:
    names = [m for m in headline if isinstance(results["pre_host"].get(m), (int, float))]
    lines = ["| " + " | ".join(["Method", "Edits"] + [LABELS.get(m, m) for m in names]) + " |",
             "|" + "---|" * (len(names) + 2),
             "| " + " | ".join(["(before editing)", "0"] + [_fmt(results["pre_host"].get(m)) for m in names]) + " |"]
    for name, r in results["methods"].items():
        host = r.get("final_host") or {}
        lines.append("| " + " | ".join([name, str(r["edits"])] + [_fmt(host.get(m)) for m in names]) + " |")
    notes = sorted(set(results["pre_host"].get("notes", [])))
    return lines + ([""] + [f"- {n}" for n in notes] if notes else [])


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _line_plot(plt, curves: Dict[str, List[tuple]], ylabel: str, title: str, path: Path) -> Path:
    """One PNG: a line of ``(edits, value)`` points per method."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, points in curves.items():
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("number of edits")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(results: Dict[str, Any], out: Path) -> List[Path]:
    plt = _plt()
    if plt is None:
        logger.warning("matplotlib is not installed: no plots written (pip install matplotlib)")
        return []

    def numeric_curves(value) -> Dict[str, List[tuple]]:
        """Per method, its curve's points where ``value(point)`` is a number (methods without any left out)."""
        curves = {name: [(p["edits"], value(p)) for p in r["curve"] if isinstance(value(p), (int, float))]
                  for name, r in results["methods"].items()}
        return {name: points for name, points in curves.items() if points}

    written = []
    for metric in results["headline"]:
        curves = numeric_curves(lambda p: p["metrics"].get(metric))
        if curves:
            label = LABELS.get(metric, metric)
            written.append(_line_plot(plt, curves, label, f"{label} vs. number of edits "
                                      f"({results['dataset']['family']})", out / f"plot_{metric}.png"))
    extras = [("perplexity", "held-out perplexity", lambda p: p.get("perplexity")),
              ("null_space_left", "null-space directions left (edited layers)",
               lambda p: (null_space_left(p) or (None,))[0])]
    for file_name, label, value in extras:
        curves = numeric_curves(value)
        if curves:
            written.append(_line_plot(plt, curves, label, f"{label} vs. number of edits",
                                      out / f"plot_{file_name}.png"))
    pre = results.get("general_pre") or {}
    for task in sorted(pre):
        curves = {}
        for name, r in results["methods"].items():
            points = [(p["edits"], 100 * p["general"][task]["f1_new"]) for p in r["curve"]
                      if task in (p.get("general") or {})]
            if not points or points[0][0] != 0:  # a curve saved without its 0-edit point
                points.insert(0, (0, 100 * pre[task]["f1_new"]))
            curves[name] = points
        written.append(_line_plot(plt, curves, f"{task} F1 (likelihood)", f"General capability: {task}",
                                  out / f"general_{task}.png"))
    return written


def write_reports(results: Dict[str, Any], out: Path, reference: Optional[Dict[str, Any]] = None,
                  plots: bool = True) -> Dict[str, Any]:
    out = Path(out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown_table(results))
    written = plot_curves(results, out) if plots else []
    if plots and reference and reference.get("representation"):
        import numpy as np

        from ..evaluation.representation import plot_projection

        afters = {name: np.load(out / "methods" / name / "representation_after.npy")
                  for name in results["methods"] if (out / "methods" / name / "representation_after.npy").exists()}
        if afters and plot_projection(np.array(reference["representation"]["before"]), afters,
                                      out / "representation.png"):
            written.append(out / "representation.png")
    results["files"] = {"json": str(out / "results.json"), "markdown": str(out / "results.md"),
                        "plots": [str(p) for p in written]}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results
