"""Preset of ``alphaedit-bench``: MEMIT, PRUNE and RECT with and without P, and AlphaEdit, on sequential CounterFact.

    .venv/bin/python benchmarks/baselines_sequential.py --edits 300 --batch-size 10 \\
        --corpus ../shared/data/wikitext/wiki.test.raw --output benchmarks/results/baselines_smollm2_300

is ``alphaedit-bench --methods unedited MEMIT MEMIT+P PRUNE PRUNE+P RECT RECT+P AlphaEdit --model smollm2 ...``
with the shipped ``hparams/<METHOD>/smollm2-135m[-projected].yaml`` of each; every other ``alphaedit-bench``
flag can follow ``--``. Every method starts from the same unedited weights and edits the same facts in the
same batches; the table has Efficacy, Generalization, Specificity and ‖ΔW·K0‖/‖W·K0‖ of the accumulated
update on held-out corpus keys. Running the same command again resumes (earlier versions' ``--resume``);
all methods go into one run folder, so there is nothing to ``--merge``. The host-step variants
(``MEMIT@easyeditor``...) need the EasyEdit source on the path. Results saved by earlier versions of this
script (``benchmarks/results/baselines_*.{json,md}``) stay as they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import optional_bench_flags, run_bench

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = ("MEMIT", "MEMIT+P", "PRUNE", "PRUNE+P", "RECT", "RECT+P", "AlphaEdit")


def bench_arguments(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--edits", default="300")
    parser.add_argument("--batch-size", default="10")
    parser.add_argument("--corpus", default=str(SHARED / "wikitext" / "wiki.test.raw"),
                        help="mom2_dataset for the statistics: a text file/folder or 'self'")
    parser.add_argument("--samples", default=None, help="mom2_n_samples")
    parser.add_argument("--max-tokens", default=None, help="mom2_max_tokens")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated alphaedit-bench labels")
    parser.add_argument("--stats-dir", default=None, help="statistics cache, shared by all methods")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "baselines_smollm2"),
                        help="the run folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="further alphaedit-bench flags, after --")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bench = ["--methods", "unedited", *methods, "--model", "smollm2", "--data", args.data, "--edits", args.edits,
             "--batch-size", args.batch_size, "--corpus", args.corpus, "--output", args.output, "--device", args.device]
    return bench + optional_bench_flags(args)


def main(argv=None) -> int:
    return run_bench(bench_arguments(argv))


if __name__ == "__main__":
    sys.exit(main())
