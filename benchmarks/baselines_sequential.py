"""MEMIT, PRUNE and RECT with and without the null-space projection P, and AlphaEdit: sequential CounterFact edits.

    .venv/bin/python benchmarks/baselines_sequential.py --edits 300 --batch-size 10 \\
        --corpus ../shared/data/wikitext/wiki.test.raw --stats-dir ~/.cache/alphaedit \\
        --output benchmarks/results/baselines_smollm2

Every method starts from the same unedited SmolLM2 weights and applies the
same facts in the same batches. Reported per method: Efficacy,
Generalization and Specificity (CounterFact probability comparisons) on the
edited facts after the last batch, and the preservation figure
‖ΔW·K0‖/‖W·K0‖ of the whole accumulated update on held-out corpus keys (the
mean over edited layers, and the largest). Saves ``OUTPUT.json`` (after each
method, so ``--resume`` skips finished ones) and ``OUTPUT.md``.
``--tiny`` runs the whole pipeline on a tiny random Llama with a BPE
tokenizer trained on the facts (a smoke test; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import corpus_problem, counterfact_records

from alphaedit_plugin import AlphaEditHyperParams, apply_alphaedit_to_model, create_state
from alphaedit_plugin.architectures import get_module, templates_for, weight_as_out_in
from alphaedit_plugin.baselines import apply_baseline_to_model, create_baseline_state, load_hparams
from alphaedit_plugin.bench.methods import HOST_STEP_LABELS, parse_baseline_label, yaml_stem
from alphaedit_plugin.metrics import counterfact_scores
from alphaedit_plugin.solve import preservation_ratio

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = ("MEMIT", "MEMIT+P", "MEMIT+P+λC0", "PRUNE", "PRUNE+P", "RECT", "RECT+P", "AlphaEdit")
# On the EasyEdit host's own compute_z / compute_ks (memit_steps: easyeditor): only with --methods, in an
# environment that has easyeditor (.venv-easyedit).
OPTIONAL_METHODS = HOST_STEP_LABELS
logger = logging.getLogger("baselines-benchmark")


def hparams_path(method: str, model_key: str) -> Path:
    if method == "AlphaEdit":
        return ROOT / "hparams" / "AlphaEdit" / f"{model_key}.yaml"
    alg, projected, steps = parse_baseline_label(method.replace("+λC0", ""))
    return ROOT / "hparams" / alg / f"{yaml_stem(model_key, projected, steps)}.yaml"


def tiny_model_and_tokenizer(records):
    """A random 4-block Llama and a BPE tokenizer trained on the facts' own text (offline, seconds)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [r[k] for r in records for k in ("prompt", "target_new", "ground_truth", "rephrase_prompt",
                                             "locality_prompt", "locality_ground_truth")]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<pad>", "<eos>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    model = LlamaForCausalLM(config).eval()
    model.config._name_or_path = "tiny-random-llama"
    return model, tok


def load_method_hparams(method: str, args):
    path = hparams_path(method, args.model_key)
    hparams = AlphaEditHyperParams.from_hparams(path) if method == "AlphaEdit" else load_hparams(path)
    hparams.mom2_dataset, hparams.mom2_n_samples, hparams.mom2_max_tokens = args.corpus, args.samples, args.max_tokens
    hparams.stats_dir = args.stats_dir
    hparams.device = args.device
    if method.endswith("+λC0"):  # P and MEMIT's λ·C0 together (the variant that constrains twice)
        hparams.projection_keeps_mom2_term = True
    if args.tiny:  # small enough for the 4-block random model
        hparams.layers, hparams.v_loss_layer, hparams.v_num_grad_steps = [1, 2], 3, 5
        hparams.context_template_count, hparams.context_template_length = 2, 3
        hparams.nullspace_threshold = 0.5
        if hasattr(hparams, "projection"):
            hparams.mom2_update_weight = 1.0
        hparams.model_name = "tiny-random-llama"
    hparams.validate()
    return hparams


def run_method(method, model, tok, original_state, requests, records, args) -> dict:
    model.load_state_dict(original_state)
    hparams = load_method_hparams(method, args)
    templates = templates_for(model, hparams)
    modules = {l: get_module(model, templates.rewrite_module_tmp.format(l)) for l in hparams.layers}
    original = {l: weight_as_out_in(m).detach().clone() for l, m in modules.items()}
    started = time.perf_counter()
    if method == "AlphaEdit":
        state = create_state(model, tok, hparams)
        core = state
    else:
        state = create_baseline_state(model, tok, hparams)
        core = state.core
    state_seconds = time.perf_counter() - started
    edit_seconds = 0.0
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start:start + args.batch_size]
        began = time.perf_counter()
        if method == "AlphaEdit":
            apply_alphaedit_to_model(model, tok, batch, hparams, state=state)
        else:
            apply_baseline_to_model(model, tok, batch, hparams, state=state)
        edit_seconds += time.perf_counter() - began
        logger.info("%s: %d/%d facts edited (%.1f s per edit)", method, start + len(batch), len(requests),
                    edit_seconds / (start + len(batch)))
    scores = counterfact_scores(model, tok, records)
    preservation = {l: preservation_ratio(weight_as_out_in(m).detach() - original[l], original[l],
                                          core.null_spaces[l].heldout_keys)
                    for l, m in modules.items() if core.null_spaces[l].heldout_keys is not None}
    return {**scores, "preservation_mean": sum(preservation.values()) / max(1, len(preservation)),
            "preservation_max": max(preservation.values(), default=float("nan")),
            "preservation_per_layer": preservation, "seconds_per_edit": edit_seconds / len(requests),
            "state_seconds": state_seconds, "hparams": str(hparams_path(method, args.model_key).relative_to(ROOT)),
            "null_space_rank": {l: s.rank for l, s in core.null_spaces.items()}}


def device_description(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(result: dict) -> str:
    lines = ["# Sequential editing: MEMIT, PRUNE, RECT with and without P, and AlphaEdit",
             "", f"{result['edits']} CounterFact edits in batches of {result['batch_size']}, model "
             f"{result['model']}, statistics corpus `{result['corpus']}`, device {result.get('device', 'cpu')}.", "",
             ("Reproduce: one process per method, then `--merge` of their JSON files (the exact commands are "
              "in the JSON's `command`)." if result.get("merged_from") else f"Reproduce: `{result['command']}`"), "",
             "| method | Efficacy | Generalization | Specificity | ‖ΔW·K0‖/‖W·K0‖ mean | max | s/edit |",
             "|---|---|---|---|---|---|---|"]
    pre = result["pre"]
    lines.append(f"| unedited | {pre['efficacy']:.1f} | {pre['generalization']:.1f} | {pre['specificity']:.1f} "
                 "| 0 | 0 | – |")
    for method in METHODS + OPTIONAL_METHODS:
        r = result["methods"].get(method)
        if r:
            lines.append(f"| {method} | {r['efficacy']:.1f} | {r['generalization']:.1f} | {r['specificity']:.1f} | "
                         f"{r['preservation_mean']:.3g} | {r['preservation_max']:.3g} | {r['seconds_per_edit']:.2f} |")
    lines += ["", "Efficacy / Generalization / Specificity: percent of facts whose new target (neighbourhood: "
              "true answer) is preferred on the edit prompt / a paraphrase / a neighbourhood prompt. "
              "Preservation: the accumulated update's effect on held-out corpus keys relative to the "
              "original output, per edited layer (lower is better)."]
    return "\n".join(lines) + "\n"


def merge_results(paths, output: Path) -> int:
    """One table from several runs with the same edits, batches and corpus (e.g. one process per method)."""
    merged = None
    for path in paths:
        part = json.loads(path.read_text())
        if merged is None:
            merged = {**part, "methods": {}, "command": [], "merged_from": []}
        settings = ("edits", "batch_size", "corpus", "samples", "model")
        if any(part.get(k) != merged.get(k) for k in settings):
            logger.error("%s was run with other settings (%s) than %s; not merged", path,
                         {k: part.get(k) for k in settings}, paths[0])
            return 2
        clash = sorted(set(part["methods"]) & set(merged["methods"]))
        if clash:
            logger.error("%s repeats method(s) %s already merged from another file", path, clash)
            return 2
        merged["methods"].update(part["methods"])
        merged["command"].append(part["command"])
        merged["merged_from"].append(str(path))
    merged["command"] = " ; ".join(merged["command"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(merged, indent=2, default=str))
    output.with_suffix(".md").write_text(markdown(merged))
    print(markdown(merged))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--corpus", default=str(SHARED / "wikitext" / "wiki.test.raw"),
                        help="mom2_dataset for the statistics: a text file/folder or 'self'")
    parser.add_argument("--samples", type=int, default=100000, help="mom2_n_samples")
    parser.add_argument("--max-tokens", type=int, default=256, help="mom2_max_tokens")
    parser.add_argument("--model-key", default="smollm2-135m", help="which hparams/<METHOD>/<key>.yaml to use")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {METHODS}, or of {OPTIONAL_METHODS} (these need easyeditor)")
    parser.add_argument("--stats-dir", default=None, help="statistics cache (shared by all methods; default: a "
                                                           "temporary folder)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "baselines_smollm2"),
                        help="path without suffix: .json and .md are written")
    parser.add_argument("--resume", action="store_true", help="keep methods already in OUTPUT.json")
    parser.add_argument("--device", default="cpu", help="torch device for the model and the edits (cpu, cuda, ...)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="only combine results of runs made with the same settings (e.g. one process per "
                             "method) into OUTPUT.json/.md, then stop")
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny random model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS) - set(OPTIONAL_METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {METHODS + OPTIONAL_METHODS}")

    output = Path(args.output)
    if args.merge:
        return merge_results([Path(f) for f in args.merge], output)

    records, problem = counterfact_records(args.data, args.edits)
    problem = problem or corpus_problem(args.corpus)
    if problem:
        logger.error("%s", problem)
        return 2
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]} for r in records]
    args.stats_dir = args.stats_dir or tempfile.mkdtemp(prefix="alphaedit-baselines-")

    torch.manual_seed(0)
    if args.tiny:
        model, tok = tiny_model_and_tokenizer(records)
        model.to(args.device)
    else:
        from alphaedit_plugin.models import load_smollm2
        model, tok = load_smollm2(device=args.device)
    original_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    output.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output.with_suffix(".json"), output.with_suffix(".md")
    result = {"command": " ".join(shlex.quote(a) for a in sys.argv), "machine": platform.platform(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "edits": args.edits,
              "batch_size": args.batch_size, "corpus": args.corpus, "samples": args.samples,
              "model": getattr(model.config, "_name_or_path", "model"), "device": device_description(args.device),
              "methods": {}}
    if args.resume and json_path.is_file():
        previous = json.loads(json_path.read_text())
        if (previous.get("edits"), previous.get("batch_size"), previous.get("corpus")) == \
                (args.edits, args.batch_size, args.corpus):
            result["methods"] = previous.get("methods", {})
        else:
            logger.warning("%s was made with other settings; starting over", json_path)
    logger.info("scoring the unedited model on %d facts", len(records))
    result["pre"] = counterfact_scores(model, tok, records)
    for method in methods:
        if method in result["methods"]:
            logger.info("%s: already in %s, skipped (--resume)", method, json_path)
            continue
        result["methods"][method] = run_method(method, model, tok, original_state, requests, records, args)
        json_path.write_text(json.dumps(result, indent=2, default=str))
        md_path.write_text(markdown(result))
    json_path.write_text(json.dumps(result, indent=2, default=str))
    md_path.write_text(markdown(result))
    print(markdown(result))
    print(f"saved {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
