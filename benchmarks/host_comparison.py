"""The plugin's AlphaEdit and the current EasyEdit's own AlphaEdit, side by side in one sitting.

    .venv/bin/python benchmarks/host_comparison.py --edits 30 --batch-size 10 \\
        --corpus ../shared/data/wikitext/wiki.test.raw --output benchmarks/results/host_comparison_smollm2_30

1. ``alphaedit-bench --methods AlphaEdit`` and ``alphaedit-bench --methods AlphaEdit@host`` (the host's
   ``apply_AlphaEdit_to_model``, unchanged: ``alphaedit_plugin/hosts/easyedit/host_alphaedit.py``), each in
   its own process (its peak memory is its own), one after the other on the same model, records, statistics
   texts and settings (``hparams/AlphaEdit/smollm2-135m.yaml``), into one run folder; then the same command
   with both methods, which reads the two finished runs and writes the combined table. Each computes its own
   statistics (the plugin's cache is ``<output>/.statistics``, not kept in git; the host's a scratch folder).
2. Where the plugin's edit time goes: one batch edited again in this process with each step timed (target
   search, keys, solve, the outcome check), beside the floor the search cannot go under: one forward and one
   backward pass of the blocks above the edited layer, on the batch's search rows, per search step.

Writes ``summary.json`` and ``summary.md`` in ``--output``: scores before and after, seconds per edit and
their ratio, statistics time and peak memory of each, and the breakdown. Needs the EasyEdit source
(``--host``, default ``../shared/hosts/EasyEdit``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from common import corpus_problem, counterfact_records, timed_calls

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
METHODS = ("AlphaEdit", "AlphaEdit@host")
METRICS = ("efficacy", "generalization", "specificity")

logger = logging.getLogger("benchmarks.host_comparison")


def bench_command(args, methods) -> List[str]:
    return [sys.executable, "-m", "alphaedit_plugin.bench.cli", "--methods", *methods, "--model", "smollm2",
            "--data", args.data, "--edits", str(args.edits), "--batch-size", str(args.batch_size),
            "--corpus", args.corpus, "--samples", str(args.samples), "--max-tokens", str(args.max_tokens),
            "--output", str(Path(args.output) / "run"), "--no-plots",
            "--stats-dir", str(Path(args.output) / ".statistics"),
            *(["--threads", str(args.threads)] if args.threads else [])]


def host_environment(host: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(host).resolve()), env.get("PYTHONPATH")) if p)
    return env


# ---------------------------------------------------------------------------
# Where the time goes
# ---------------------------------------------------------------------------
def search_rows(tok, requests, context_templates):
    """The search's rows as token ids: every context prefix + prompt + target (less its last token), and the
    KL prompt; with the number of answer positions read in each."""
    from alphaedit_plugin.compute_targets import KL_PROMPT
    from alphaedit_plugin.context_templates import flatten
    from alphaedit_plugin.tracing import encode

    rows, answers = [], []
    for request in requests:
        target = encode(tok, request.target, special_tokens=False)
        for context in flatten(context_templates):
            rows.append(encode(tok, context.format(request.prompt_template.format(request.subject))) + target[:-1])
            answers.append(len(target))
        rows.append(encode(tok, KL_PROMPT.format(request.subject)))
        answers.append(1)
    return rows, answers


def floor_step_seconds(model, tok, requests, hparams, context_templates, repeats: int = 3) -> Dict[str, float]:
    """One forward and one backward pass of the blocks above the edited layer (to the loss layer, then the
    final norm and the head at the answer positions) on the batch's search rows: the least a search step
    costs once everything below the edited layer is computed once per batch. Llama-family layout."""
    from alphaedit_plugin.tracing import pad_token_id

    layer, loss_layer = hparams.layers[-1], hparams.v_loss_layer
    rows, answers = search_rows(tok, requests, context_templates)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_token_id(tok), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    inner = model.model
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]  # block `layer`'s output
    positions = torch.arange(width)[None]
    gather_rows = torch.cat([torch.full((n,), i) for i, n in enumerate(answers)])
    gather_positions = torch.cat([torch.arange(len(r) - n, len(r)) for r, n in zip(rows, answers)])
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:  # as in the search: the gradient of δ only, none of the weights'
        parameter.requires_grad_(False)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        x = hidden.clone().requires_grad_(True)
        start = x
        embeddings = inner.rotary_emb(x, positions)
        for block in inner.layers[layer + 1: loss_layer + 1]:
            out = block(x, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
            x = out[0] if isinstance(out, tuple) else out
        picked = inner.norm(x)[gather_rows, gather_positions]
        torch.log_softmax(model.lm_head(picked).float(), dim=-1)[:, 0].sum().backward()
        assert start.grad is not None
        times.append(time.perf_counter() - started)
    for parameter, flag in flags:
        parameter.requires_grad_(flag)
    seconds = sorted(times[1:])[len(times[1:]) // 2]
    return {"rows": len(rows), "padded_tokens": int(ids.numel()), "blocks": loss_layer - layer,
            "seconds_per_pass": seconds, "seconds_per_token": seconds / ids.numel()}


def breakdown(args) -> Dict[str, object]:
    """One batch edited on a fresh state (statistics from the run's cache), each step timed, and the floor."""
    from alphaedit_plugin import AlphaEditHyperParams, normalise_requests
    from alphaedit_plugin import compute_targets, edit_loop
    from alphaedit_plugin.methods.base import PluginSteps
    from alphaedit_plugin.models import load_smollm2

    records, _ = counterfact_records(args.data, args.batch_size)
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]} for r in records]
    hparams = AlphaEditHyperParams.from_hparams(str(ROOT / "hparams" / "AlphaEdit" / "smollm2-135m.yaml"))
    hparams.mom2_dataset, hparams.mom2_n_samples, hparams.mom2_max_tokens = args.corpus, args.samples, args.max_tokens
    hparams.stats_dir = str(Path(args.output) / ".statistics")
    model, tok = load_smollm2()
    state = edit_loop.create_state(model, tok, hparams)
    calls: Dict[str, List[float]] = {}
    searched = {"tokens": 0}
    original_targets, original_inputs = PluginSteps.compute_targets, compute_targets._Batch.forward_inputs

    def remember_steps(self, *a, **k):
        result = original_targets(self, *a, **k)
        searched["steps"] = result.steps
        return result

    def count_tokens(self):  # called once per search step, with the rows that step runs
        inputs = original_inputs(self)
        searched["tokens"] += int(inputs["input_ids"].numel())
        return inputs

    with contextlib.ExitStack() as stack:
        PluginSteps.compute_targets, compute_targets._Batch.forward_inputs = remember_steps, count_tokens
        stack.callback(setattr, PluginSteps, "compute_targets", original_targets)
        stack.callback(setattr, compute_targets._Batch, "forward_inputs", original_inputs)
        for owner, name in ((PluginSteps, "compute_targets"), (PluginSteps, "compute_keys"),
                            (edit_loop, "solve_layer"), (edit_loop, "_measure_outcome"), (edit_loop, "apply_to_model")):
            stack.enter_context(timed_calls(owner, name, calls.setdefault(name, [])))
        edit_loop.apply_to_model(model, tok, requests, hparams, state=state)
    totals = {name: sum(seconds) for name, seconds in calls.items()}
    floor = floor_step_seconds(model, tok, normalise_requests(requests), hparams, state.context_templates)
    parts = {"target_search": totals["compute_targets"], "keys": totals["compute_keys"],
             "solve": totals["solve_layer"], "outcome_check": totals["_measure_outcome"]}
    parts["other"] = totals["apply_to_model"] - sum(parts.values())
    steps = searched.get("steps", hparams.v_num_grad_steps)
    floor["search_tokens"] = searched["tokens"]  # padded tokens the search's passes ran, over all its steps
    floor["seconds"] = floor["seconds_per_token"] * searched["tokens"]
    return {"facts": len(requests), "seconds": totals["apply_to_model"], "parts_seconds": parts,
            "search_steps": steps, "floor": floor, "floor_seconds_per_edit": floor["seconds"] / len(requests)}


# ---------------------------------------------------------------------------
def summarise(output: Path) -> Dict[str, object]:
    results = json.loads((output / "run" / "results.json").read_text())
    rows = {}
    for method in METHODS:
        entry = results["methods"][method]
        rows[method] = {"final": {m: entry["final"].get(m) for m in METRICS},
                        "seconds_per_edit": entry.get("seconds_per_edit"),
                        "statistics_seconds": entry.get("prepare_seconds"),
                        "peak_memory_mb": (entry.get("peak_memory_mb") or {}).get("process_rss")}
    ours, host = rows["AlphaEdit"], rows["AlphaEdit@host"]
    return {"pre": {m: results["pre"].get(m) for m in METRICS}, "methods": rows,
            "edit_speedup": host["seconds_per_edit"] / ours["seconds_per_edit"],
            "statistics_speedup": host["statistics_seconds"] / ours["statistics_seconds"],
            "machine": results.get("machine"), "bench_command": results.get("command")}


def markdown(summary: Dict[str, object], args) -> str:
    def number(value, digits=1):
        return "–" if value is None else f"{value:.{digits}f}"

    pre = summary["pre"]
    lines = [f"# AlphaEdit: the plugin and the current EasyEdit's own, {args.edits} CounterFact edits in batches of "
             f"{args.batch_size} (SmolLM2-135M, float32)", "",
             "Efficacy, Generalization, Specificity: % of cases (higher is better). Seconds per edit: the edit phase "
             "only; statistics: statistics and projectors of the five layers (lower is better); peak memory: the "
             "process's resident set.", "",
             "| method | Efficacy | Generalization | Specificity | s / edit | statistics s | peak memory MB |",
             "|---|---|---|---|---|---|---|",
             f"| (before editing) | {number(pre['efficacy'])} | {number(pre['generalization'])} | "
             f"{number(pre['specificity'])} | | | |"]
    for method, row in summary["methods"].items():
        final = row["final"]
        lines.append(f"| {method} | {number(final['efficacy'])} | {number(final['generalization'])} | "
                     f"{number(final['specificity'])} | {number(row['seconds_per_edit'], 2)} | "
                     f"{number(row['statistics_seconds'])} | {number(row['peak_memory_mb'], 0)} |")
    lines += ["", f"The plugin's edit phase is {summary['edit_speedup']:.1f}x faster than the host's, its statistics "
                  f"{summary['statistics_speedup']:.1f}x."]
    parts = summary.get("breakdown")
    if parts:
        floor = parts["floor"]
        lines += ["", f"Where the plugin's time goes, one batch of {parts['facts']} edited again on a fresh state "
                      f"({parts['seconds']:.1f} s, {parts['search_steps']} search steps):", "",
                  "| step | seconds |", "|---|---|"]
        lines += [f"| {name.replace('_', ' ')} | {seconds:.2f} |" for name, seconds in parts["parts_seconds"].items()]
        search = parts["parts_seconds"]["target_search"]
        lines += ["", f"Floor of the search: one forward and backward pass of the {floor['blocks']} blocks above the "
                      f"edited layer (and the head at the answer positions) costs {1000 * floor['seconds_per_token']:.2f} "
                      f"ms per token (measured on the batch's {floor['rows']} full rows, {floor['padded_tokens']} "
                      f"padded tokens). The search's passes ran {floor['search_tokens']} padded tokens over its "
                      f"steps (the rows from the subject on; converged facts leave), so the floor is "
                      f"{floor['seconds']:.1f} s, {parts['floor_seconds_per_edit']:.2f} s per edit; the search took "
                      f"{search:.1f} s, {search / floor['seconds']:.2f}x the floor."]
    machine = summary.get("machine") or {}
    lines += ["", f"Machine: {machine.get('device_name', '?')}, {machine.get('cpu_threads', '?')} threads, torch "
                  f"{machine.get('torch', '?')}, transformers {summary.get('transformers', '?')}. Commands in "
                  "`summary.json`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--corpus", default=str(SHARED / "data" / "wikitext" / "wiki.test.raw"))
    parser.add_argument("--samples", type=int, default=100000)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--host", default=str(SHARED / "hosts" / "EasyEdit"), help="the EasyEdit source folder")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "host_comparison_smollm2_30"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _, problem = counterfact_records(args.data, args.edits)
    problem = problem or corpus_problem(args.corpus)
    if problem is None and not (Path(args.host) / "easyeditor").is_dir():
        problem = f"the EasyEdit source was not found at {args.host} (no easyeditor/ there); pass --host PATH"
    if problem:
        logger.error("%s", problem)
        return 2
    output = Path(args.output)
    commands = [bench_command(args, [method]) for method in METHODS] + [bench_command(args, METHODS)]
    for command in commands:
        logger.info("%s", " ".join(command[1:]))
        if subprocess.run(command, cwd=ROOT, env=host_environment(args.host)).returncode != 0:
            logger.error("this run failed; its folder %s resumes when this is run again", output / "run")
            return 1
    summary = summarise(output)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary["breakdown"] = breakdown(args)
    summary["command"] = " ".join(["benchmarks/host_comparison.py", *(argv if argv is not None else sys.argv[1:])])
    summary["bench_commands"] = [" ".join(c[1:]) for c in commands]
    summary["platform"] = platform.platform()
    summary["transformers"] = __import__("transformers").__version__
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    (output / "summary.md").write_text(markdown(summary, args))
    print(markdown(summary, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
