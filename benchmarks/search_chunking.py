"""The target search's chunks on the CPU: cut at the token budget only, or also where padding would grow a chunk.

    .venv/bin/python benchmarks/search_chunking.py --output benchmarks/results/search_chunking_smollm2.json

For each data set (KnowEdit WikiBio, batches of 10 facts: long rows of unlike lengths; CounterFact, batches of
100: short rows), counts the padded tokens of one search step over the first batches under each chunking (the
facts in their order as earlier versions took them, by width, by width with the CPU's padding cut), from
the rows from each subject on (as the search runs them, the prefixes computed once), and times the search of
the first batch at the last edited layer of SmolLM2 with ``--steps`` steps under each, with the largest difference
of the target values to the first's (the same search up to rounding, which Adam's first steps enlarge).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
logger = logging.getLogger("benchmark")

DATA = {"knowedit_wikibio": (SHARED / "knowedit" / "WikiBio" / "wikibio-test-all.json", 10),
        "counterfact": (SHARED / "counterfact" / "counterfact-edit.json", 100)}


def padded_tokens(prompts, groups) -> int:
    """Tokens of one step over ``groups``: each chunk's rows padded to its widest, from the subject on."""
    from alphaedit_plugin.compute_targets import _row_lengths

    total = 0
    for group in groups:
        widths = [length for i in group for length in _row_lengths(prompts[i], from_subject=True)]
        total += len(widths) * max(widths)
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="batches counted per data set")
    parser.add_argument("--steps", type=int, default=5, help="search steps of the timed batch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "search_chunking_smollm2.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from alphaedit_plugin import AlphaEditHyperParams, normalise_requests
    from alphaedit_plugin.architectures import templates_for
    from alphaedit_plugin.compute_targets import (CPU_MIN_CHUNK_TOKENS, CPU_PADDING_TOLERANCE, TOKENS_PER_PASS,
                                                  _fact_prompts, chunk_by_tokens, compute_target_values)
    from alphaedit_plugin.context_templates import flatten, generate_context_templates
    from alphaedit_plugin.evaluation.datasets import load_dataset
    from alphaedit_plugin.models import load_smollm2

    model, tok = load_smollm2()
    hparams = AlphaEditHyperParams.from_hparams(ROOT / "hparams" / "AlphaEdit" / "smollm2-135m.yaml")
    hparams.v_num_grad_steps = args.steps
    context_templates = generate_context_templates(model, tok, hparams.context_template_count,
                                                   hparams.context_template_length, hparams.seed)
    contexts, templates, layer = flatten(context_templates), templates_for(model, hparams), hparams.layers[-1]
    chunkings = {"in order, budget only (earlier versions)": dict(padding_tolerance=math.inf, group_by_width=False),
                 "by width, budget only": dict(padding_tolerance=math.inf),
                 f"by width, budget and padding tolerance {CPU_PADDING_TOLERANCE} (the CPU's default)":
                     dict(padding_tolerance=CPU_PADDING_TOLERANCE)}
    result = {"command": shlex.join(["benchmarks/search_chunking.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
              "token_budget": TOKENS_PER_PASS, "search_steps": args.steps, "data": {}}
    for name, (path, batch_size) in DATA.items():
        cases = load_dataset(path).cases[:args.batches * batch_size]
        requests = normalise_requests([case.requests[0] for case in cases])
        figures = {"batch_size": batch_size, "batches": args.batches}
        for label, options in chunkings.items():
            tokens = chunks = 0
            for start in range(0, len(requests), batch_size):
                prompts = [_fact_prompts(tok, r, i, contexts, hparams.fact_token)
                           for i, r in enumerate(requests[start:start + batch_size])]
                groups = chunk_by_tokens(prompts, TOKENS_PER_PASS, options["padding_tolerance"],
                                         by_width=options.get("group_by_width", True),
                                         min_tokens=CPU_MIN_CHUNK_TOKENS, from_subject=True)  # as the search does
                tokens += padded_tokens(prompts, groups)
                chunks += len(groups)
            figures[label] = {"padded_tokens_per_step": tokens, "chunks_per_batch": chunks / args.batches}
        searched = {}
        for label, options in chunkings.items():
            began = time.perf_counter()
            searched[label] = compute_target_values(model, tok, requests[:batch_size], hparams, templates, layer,
                                                    context_templates, **options)
            figures[label]["first_batch_search_seconds"] = round(time.perf_counter() - began, 1)
            logger.info("%s, %s: %s", name, label, figures[label])
        first, *others = searched.values()
        figures["largest_value_difference_to_the_first_relative"] = max(
            float(((first.values - other.values).norm(dim=1) / first.values.norm(dim=1)).max()) for other in others)
        result["data"][name] = figures
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
