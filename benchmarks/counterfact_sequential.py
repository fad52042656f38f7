"""Preset of ``alphaedit-bench``: AlphaEdit on SmolLM2 with sequential CounterFact edits, beside the unedited model.

    .venv/bin/python benchmarks/counterfact_sequential.py --edits 100 --batch-size 10 \\
        --corpus ../shared/data/wikitext/wiki.test.raw --output benchmarks/results/counterfact_smollm2_wikitext

is ``alphaedit-bench --methods AlphaEdit unedited --model smollm2 --data <CounterFact> ...`` with this
script's defaults; every other ``alphaedit-bench`` flag can follow ``--``. ``--output`` is the run folder
(a ``.json`` suffix, as earlier versions of this script took, is dropped). The results (``results.json``,
``results.md``: Efficacy, Generalization, Specificity, seconds per edit, statistics time, peak memory,
‖ΔW·K0‖/‖W·K0‖ of the accumulated update) are the runner's. The speed of the batched target search has its
own benchmark, ``benchmarks/target_search.py``. Results saved by earlier versions of this script
(``benchmarks/results/counterfact_smollm2_*.json``) stay as they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import optional_bench_flags, run_bench

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def bench_arguments(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--edits", default="100")
    parser.add_argument("--batch-size", default="10")
    parser.add_argument("--corpus", default=str(SHARED / "wikitext" / "wiki.test.raw"),
                        help="mom2_dataset: a text file/folder or 'self'")
    parser.add_argument("--samples", default=None, help="mom2_n_samples")
    parser.add_argument("--max-tokens", default=None, help="mom2_max_tokens")
    parser.add_argument("--hparams", default=str(ROOT / "hparams" / "AlphaEdit" / "smollm2-135m.yaml"))
    parser.add_argument("--stats-dir", default=None, help="statistics cache (default: alphaedit-bench's)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "counterfact_smollm2"))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="further alphaedit-bench flags, after --")
    args = parser.parse_args(argv)
    output = args.output[:-5] if args.output.endswith(".json") else args.output
    bench = ["--methods", "AlphaEdit", "unedited", "--model", "smollm2", "--data", args.data, "--edits", args.edits,
             "--batch-size", args.batch_size, "--corpus", args.corpus, "--method-hparams",
             f"AlphaEdit={args.hparams}", "--output", output]
    return bench + optional_bench_flags(args)


def main(argv=None) -> int:
    return run_bench(bench_arguments(argv))


if __name__ == "__main__":
    sys.exit(main())
