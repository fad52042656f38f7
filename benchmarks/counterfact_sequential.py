"""Sequential AlphaEdit on SmolLM2 with real CounterFact facts: quality, speed, memory.

    .venv/bin/python benchmarks/counterfact_sequential.py --edits 100 --batch-size 10 \\
        --corpus ../shared/data/wikitext/wiki.test.raw --output benchmarks/results/counterfact_smollm2_wikitext.json

Prints and saves (JSON): pre- and post-edit Efficacy / Generalization /
Specificity (CounterFact probability comparisons), seconds per edit, the time
of the statistics and projector steps (first run and cached), peak memory,
the preservation figure per layer (per batch and cumulative), and the speed
and quality of the batched target search against the one-fact-at-a-time
search on the same facts.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import corpus_problem, counterfact_records

from alphaedit_plugin import AlphaEditHyperParams, apply_alphaedit_to_model, create_state, normalise_requests
from alphaedit_plugin.architectures import templates_for, weight_as_out_in, get_module
from alphaedit_plugin.compute_targets import compute_target_values, compute_target_values_one_by_one
from alphaedit_plugin.metrics import counterfact_scores
from alphaedit_plugin.models import load_smollm2
from alphaedit_plugin.solve import preservation_ratio

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
logger = logging.getLogger("benchmark")


def probe_keys(model, tok, texts, module_names) -> dict:
    """Inputs of the edited modules on every token of ``texts`` (text neither corpus contains)."""
    from alphaedit_plugin.tracing import capture_inputs

    keys = {name: [] for name in module_names}
    with torch.no_grad(), capture_inputs(model, list(module_names)) as captured:
        for text in texts:
            model(input_ids=torch.tensor([tok(text)["input_ids"]]))
            for name in module_names:
                keys[name].append(captured[name][0].float())
    return {name: torch.cat(rows) for name, rows in keys.items()}


def load_probe_texts(path: Path, count: int) -> list:
    texts = []
    for line in path.read_text().splitlines()[:count]:
        record = json.loads(line)
        texts.append(f"{record['goal']} {record['sol1']}")
    return texts


def search_comparison(model, tok, requests, hparams, state) -> dict:
    """The batched search against the one-fact-at-a-time search on the same facts.

    "reference" is the search as the original implementations run it: one
    fact at a time, every step over the whole prompt. The model is unchanged
    by all three.
    """
    templates = templates_for(model, hparams)
    layer = hparams.layers[-1]
    normalised = normalise_requests(requests)
    runs = {}
    for name, function, cache in (("batched", compute_target_values, True),
                                  ("one_by_one", compute_target_values_one_by_one, True),
                                  ("reference", compute_target_values_one_by_one, False)):
        started = time.perf_counter()
        result = function(model, tok, normalised, hparams, templates, layer, state.context_templates,
                          use_prefix_cache=cache)
        runs[name] = (time.perf_counter() - started, result)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--corpus", default=str(SHARED / "wikitext" / "wiki.test.raw"),
                        help="mom2_dataset: a text file/folder or 'self'")
    parser.add_argument("--samples", type=int, default=100000, help="mom2_n_samples")
    parser.add_argument("--max-tokens", type=int, default=256, help="mom2_max_tokens")
    parser.add_argument("--hparams", default=str(ROOT / "hparams" / "AlphaEdit" / "smollm2-135m.yaml"))
    parser.add_argument("--stats-dir", default=None, help="cache folder (default: a fresh temporary one, so the "
                                                           "first-run time is measured)")
    parser.add_argument("--probe", default=str(SHARED / "locality" / "piqa_valid.jsonl"),
                        help="JSONL (PIQA) whose texts give keys outside any statistics corpus, to compare corpora")
    parser.add_argument("--probe-count", type=int, default=200)
    parser.add_argument("--search-facts", type=int, default=10, help="facts in the batched vs one-by-one comparison")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "counterfact_smollm2.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    records, problem = counterfact_records(args.data, args.edits)
    problem = problem or corpus_problem(args.corpus)
    if problem:
        logger.error("%s", problem)
        return 2
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
                 "case_id": r.get("case_id")} for r in records]

    torch.manual_seed(0)
    hparams = AlphaEditHyperParams.from_hparams(args.hparams)
    hparams.mom2_dataset, hparams.mom2_n_samples, hparams.mom2_max_tokens = args.corpus, args.samples, args.max_tokens
    hparams.stats_dir = args.stats_dir or tempfile.mkdtemp(prefix="alphaedit-bench-")
    model, tok = load_smollm2(device=hparams.torch_device)
    templates = templates_for(model, hparams)
    modules = {l: get_module(model, templates.rewrite_module_tmp.format(l)) for l in hparams.layers}
    original = {l: weight_as_out_in(m).detach().clone() for l, m in modules.items()}
    probe = None
    if Path(args.probe).is_file():
        names = {l: templates.rewrite_module_tmp.format(l) for l in hparams.layers}
        captured = probe_keys(model, tok, load_probe_texts(Path(args.probe), args.probe_count), names.values())
        probe = {l: captured[names[l]] for l in hparams.layers}

    result = {"command": " ".join(shlex.quote(a) for a in sys.argv), "machine": platform.platform(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "hparams": hparams.method_fields(),
              "edits": args.edits, "batch_size": args.batch_size}
    logger.info("scoring the unedited model on %d facts", len(records))
    result["pre"] = counterfact_scores(model, tok, records)

    started = time.perf_counter()
    state = create_state(model, tok, hparams)
    result["state_seconds_first"] = time.perf_counter() - started
    started = time.perf_counter()
    state = create_state(model, tok, hparams)
    result["state_seconds_cached"] = time.perf_counter() - started
    result["null_space_rank"] = {l: s.rank for l, s in state.null_spaces.items()}
    result["statistics_tokens"] = state.null_spaces[hparams.layers[0]].token_count

    result["target_search"] = search_comparison(model, tok, requests[: args.search_facts], hparams, state)
    logger.info("target search: %s", result["target_search"])

    edit_seconds = 0.0
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start:start + args.batch_size]
        began = time.perf_counter()
        apply_alphaedit_to_model(model, tok, batch, hparams, state=state)
        edit_seconds += time.perf_counter() - began
        logger.info("edited %d/%d facts (%.1f s per edit so far)", start + len(batch), len(requests),
                    edit_seconds / (start + len(batch)))
    result["seconds_per_edit"] = edit_seconds / len(requests)
    result["post"] = counterfact_scores(model, tok, records)
    result["preservation_per_batch_max"] = [max(r.preservation.values()) for r in state.edit_log]
    result["preservation_cumulative"] = {
        l: preservation_ratio(weight_as_out_in(m).detach() - original[l], original[l], state.null_spaces[l].heldout_keys)
        for l, m in modules.items() if state.null_spaces[l].heldout_keys is not None
    }
    if probe is not None:
        result["preservation_cumulative_probe"] = {
            l: preservation_ratio(weight_as_out_in(m).detach() - original[l], original[l], probe[l])
            for l, m in modules.items()
        }
        result["probe"] = f"{args.probe} (first {args.probe_count} records, goal + sol1)"
    result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    search = result["target_search"]
    print(f"CounterFact, {args.edits} edits in batches of {args.batch_size}, statistics corpus {args.corpus}")
    print(f"{'':14} {'Efficacy':>9} {'General.':>9} {'Specif.':>9}")
    for name in ("pre", "post"):
        s = result[name]
        print(f"{name:14} {s['efficacy']:9.1f} {s['generalization']:9.1f} {s['specificity']:9.1f}")
    print(f"seconds per edit {result['seconds_per_edit']:.2f}; statistics+projectors first {result['state_seconds_first']:.1f} s, "
          f"cached {result['state_seconds_cached']:.1f} s; peak memory {result['peak_memory_mb']:.0f} MB")
    print(f"target search on {search['facts']} facts: batched {search['batched']['seconds']:.1f} s, one by one "
          f"{search['one_by_one']['seconds']:.1f} s, reference (one by one, full prompt each step) "
          f"{search['reference']['seconds']:.1f} s: {search['speedup_vs_reference']:.1f}x faster than the reference; "
          f"mean target probability {search['batched']['mean_target_probability']:.3f} vs "
          f"{search['reference']['mean_target_probability']:.3f}")
    print("preservation ‖ΔW·K0‖/‖W·K0‖ on held-out keys, cumulative: "
          + ", ".join(f"layer {l}: {v:.3f}" for l, v in result["preservation_cumulative"].items()))
    if probe is not None:
        print("preservation on probe text outside any corpus (PIQA), cumulative: "
              + ", ".join(f"layer {l}: {v:.3f}" for l, v in result["preservation_cumulative_probe"].items()))
    print(f"saved {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
