"""Speed of the target search: batched over the facts, one fact at a time, and the reference search.

    .venv/bin/python benchmarks/target_search.py --facts 10 --output benchmarks/results/target_search_smollm2.json

"reference" is the search as the original implementations run it: one fact at a time, every step over the
whole prompt. The three run on the same CounterFact facts with the same context prefixes at the last edited
layer of SmolLM2 (``hparams/AlphaEdit/smollm2-135m.yaml``); the model is unchanged by all three. Prints and
saves each one's seconds, its mean target probability and final loss, and its largest difference to the
reference's target values.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from common import counterfact_records

from alphaedit_plugin import AlphaEditHyperParams, normalise_requests
from alphaedit_plugin.architectures import templates_for
from alphaedit_plugin.compute_targets import compute_target_values, compute_target_values_one_by_one
from alphaedit_plugin.context_templates import generate_context_templates
from alphaedit_plugin.models import load_smollm2

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
logger = logging.getLogger("benchmark")


def search_comparison(model, tok, requests, hparams, context_templates) -> dict:
    templates = templates_for(model, hparams)
    layer = hparams.layers[-1]
    normalised = normalise_requests(requests)
    runs = {}
    for name, function, cache in (("batched", compute_target_values, True),
                                  ("one_by_one", compute_target_values_one_by_one, True),
                                  ("reference", compute_target_values_one_by_one, False)):
        started = time.perf_counter()
        result = function(model, tok, normalised, hparams, templates, layer, context_templates,
                          use_prefix_cache=cache)
        runs[name] = (time.perf_counter() - started, result)
        logger.info("%s: %.1f s", name, runs[name][0])
    reference = runs["reference"][1]
    summary = {"facts": len(requests)}
    for name, (seconds, result) in runs.items():
        difference = (result.values - reference.values).norm(dim=1) / reference.values.norm(dim=1)
        summary[name] = {
            "seconds": seconds,
            "mean_target_probability": sum(result.target_probability) / len(requests),
            "mean_final_loss": sum(result.final_loss) / len(requests),
            "max_relative_difference_to_reference": float(difference.max()),
        }
    summary["speedup_vs_reference"] = runs["reference"][0] / runs["batched"][0]
    summary["speedup_vs_one_by_one"] = runs["one_by_one"][0] / runs["batched"][0]
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--facts", type=int, default=10)
    parser.add_argument("--hparams", default=str(ROOT / "hparams" / "AlphaEdit" / "smollm2-135m.yaml"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "target_search_smollm2.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    records, problem = counterfact_records(args.data, args.facts)
    if problem:
        logger.error("%s", problem)
        return 2
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]} for r in records]
    hparams = AlphaEditHyperParams.from_hparams(args.hparams)
    model, tok = load_smollm2(device=args.device)
    contexts = generate_context_templates(model, tok, hparams.context_template_count,
                                          hparams.context_template_length, hparams.seed)
    summary = search_comparison(model, tok, requests, hparams, contexts)
    result = {"command": " ".join(shlex.quote(a) for a in sys.argv), "machine": platform.platform(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device,
              "hparams": hparams.method_fields(), "target_search": summary}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    logger.info("target search on %d facts: batched %.1f s, one by one %.1f s, reference %.1f s: %.1fx faster than "
                "the reference; mean target probability %.3f vs %.3f", summary["facts"],
                summary["batched"]["seconds"], summary["one_by_one"]["seconds"], summary["reference"]["seconds"],
                summary["speedup_vs_reference"], summary["batched"]["mean_target_probability"],
                summary["reference"]["mean_target_probability"])
    logger.info("saved %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
