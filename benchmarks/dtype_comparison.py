"""AlphaEdit on SmolLM2 in float32, bfloat16 and float16, side by side: the same CounterFact edits in each.

    .venv/bin/python benchmarks/dtype_comparison.py --edits 30 --batch-size 10 \\
        --corpus ../shared/data/wikitext/wiki.test.raw --output benchmarks/results/dtype_smollm2_30

runs ``alphaedit-bench --methods AlphaEdit --dtype D ...`` once per dtype, each in its own process (so that
its peak memory is its own), its own run folder under ``--output`` (re-running resumes) and its own statistics
cache (``<output>/<dtype>/.statistics``, not kept in git; ``--stats-dir`` shares one instead), so that each
computes its statistics in the model's dtype and the statistics time is its own. It then writes
``summary.json`` and ``summary.md`` there: Efficacy, Generalization and Specificity before and after, seconds
per edit, statistics time and peak memory per dtype, and each figure's difference from float32. Keys,
statistics, projector and solve are float32/float64 in every run; only the model's dtype differs.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from common import corpus_problem, counterfact_records

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DTYPES = ("float32", "bfloat16", "float16")
METRICS = ("efficacy", "generalization", "specificity")

logger = logging.getLogger("benchmarks.dtype_comparison")


def bench_command(args, dtype: str) -> List[str]:
    return [sys.executable, "-m", "alphaedit_plugin.bench.cli", "--methods", "AlphaEdit", "--model", "smollm2",
            "--data", args.data, "--edits", str(args.edits), "--batch-size", str(args.batch_size),
            "--corpus", args.corpus, "--samples", str(args.samples), "--max-tokens", str(args.max_tokens),
            "--dtype", dtype, "--output", str(Path(args.output) / dtype), "--no-plots",
            "--stats-dir", args.stats_dir or str(Path(args.output) / dtype / ".statistics"),
            *(["--threads", str(args.threads)] if args.threads else [])]


def summarise(output: Path, dtypes) -> Dict[str, object]:
    rows = {}
    for dtype in dtypes:
        results = json.loads((output / dtype / "results.json").read_text())
        method = results["methods"]["AlphaEdit"]
        rows[dtype] = {
            "pre": {m: results["pre"].get(m) for m in METRICS},
            "final": {m: method["final"].get(m) for m in METRICS},
            "seconds_per_edit": method.get("seconds_per_edit"),
            "prepare_seconds": method.get("prepare_seconds"),
            "peak_memory_mb": method.get("peak_memory_mb") or results.get("peak_memory_mb"),
            "command": results.get("command"),
            "machine": results.get("machine"),
        }
    base = rows.get("float32")
    if base:
        for row in rows.values():
            row["final_minus_float32"] = {m: (row["final"][m] - base["final"][m])
                                          if None not in (row["final"][m], base["final"][m]) else None
                                          for m in METRICS}
    return rows


def markdown(rows: Dict[str, dict], args) -> str:
    def number(value, digits=1):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [f"# AlphaEdit on SmolLM2 by model dtype: {args.edits} CounterFact edits in batches of {args.batch_size}",
             "", "Efficacy, Generalization, Specificity: % of cases (higher is better); Δ: difference from float32 "
             "in points. Seconds per edit: the edit phase only (lower is better); statistics: the time to compute or "
             "load the statistics and projectors; peak memory: the process's resident set (MB).", "",
             "| dtype | Efficacy | Generalization | Specificity (unedited) | Δ Eff. | Δ Gen. | Δ Spec. | s / edit | "
             "statistics s | peak memory MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dtype, row in rows.items():
        final, delta = row["final"], row.get("final_minus_float32", {})
        memory = (row.get("peak_memory_mb") or {}).get("process_rss")
        lines.append(f"| {dtype} | {number(final['efficacy'])} | {number(final['generalization'])} | "
                     f"{number(final['specificity'])} ({number(row['pre']['specificity'])}) | "
                     f"{number(delta.get('efficacy'))} | {number(delta.get('generalization'))} | "
                     f"{number(delta.get('specificity'))} | {number(row['seconds_per_edit'], 2)} | "
                     f"{number(row['prepare_seconds'])} | {number(memory, 0)} |")
    machine = next(iter(rows.values())).get("machine") or {}
    lines += ["", f"Machine: {machine.get('device_name', '?')}, {machine.get('cpu_threads', '?')} threads, torch "
                  f"{machine.get('torch', '?')}. Commands: one per dtype, in `summary.json`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--corpus", default=str(SHARED / "wikitext" / "wiki.test.raw"))
    parser.add_argument("--samples", type=int, default=100000)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--stats-dir", default=None, help="one statistics cache for every dtype (default: one each)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "dtype_smollm2_30"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _, problem = counterfact_records(args.data, args.edits)
    problem = problem or corpus_problem(args.corpus)
    if problem:
        logger.error("%s", problem)
        return 2
    output = Path(args.output)
    for dtype in args.dtypes:
        logger.info("%s: %s", dtype, " ".join(bench_command(args, dtype)[1:]))
        if subprocess.run(bench_command(args, dtype), cwd=ROOT).returncode != 0:
            logger.error("the %s run failed; its folder %s resumes when this is run again", dtype, output / dtype)
            return 1
    rows = summarise(output, args.dtypes)
    (output / "summary.json").write_text(json.dumps({"command": " ".join(["benchmarks/dtype_comparison.py",
                                                                          *(argv or sys.argv[1:])]),
                                                     "dtypes": rows}, indent=2))
    (output / "summary.md").write_text(markdown(rows, args))
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
