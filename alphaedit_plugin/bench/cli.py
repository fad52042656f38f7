"""``alphaedit-bench``: the paper's sequential-editing protocol on any model, dataset and methods.

Example (SmolLM2, 100 CounterFact edits in batches of 10, curves every 2 batches)::

    alphaedit-bench --methods AlphaEdit unedited --model smollm2 \\
        --data ../shared/data/counterfact/counterfact-edit.json --edits 100 --batch-size 10 \\
        --hparams hparams/AlphaEdit/smollm2-135m.yaml --corpus ../shared/data/wikitext/wiki.test.raw \\
        --eval-every 2 --output runs/cf100

Baselines (MEMIT, PRUNE, RECT, each with ``+P``, AlphaEdit's null-space projection) take one yaml each::

    alphaedit-bench --methods AlphaEdit MEMIT MEMIT+P --model smollm2 --data ... --edits 500 --batch-size 50 \
        --eval-every 2 --output runs/x \
        --method-hparams MEMIT=hparams/MEMIT/smollm2-135m.yaml MEMIT+P=hparams/MEMIT/smollm2-135m-projected.yaml

For ``--model smollm2`` the yaml files under ``hparams/`` are the defaults, so the flags can be left out.
Re-running the same command resumes from the last finished batch.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Dict, List, Optional

from ..evaluation.datasets import FAMILIES, PARSERS, DatasetError
from ..evaluation.glue import TASKS
from ..evaluation.scoring import EvalOptions
from ..run_settings import canonical_dtype, check_device
from .methods import (MethodOptions, available_methods, default_hparams_path, load_method_hparams,
                      method_uses_hparams)
from .runner import BenchConfig, BenchmarkError, BenchmarkPaused, run_benchmark

logger = logging.getLogger("alphaedit_plugin.bench")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alphaedit-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["AlphaEdit"], help=f"registered: {', '.join(available_methods())}")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (the built-in default), a local checkpoint folder or a hub id (offline: from the "
                        "local Hugging Face cache)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None,
                   help="the model's dtype: float32, bfloat16 or float16 (bf16, fp16); sets every method's dtype. "
                        "Default: the methods' hparams (dtype, or fp16: true), else float32")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the model's own code from its folder or hub repository")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's, one per core). Give each of several runs sharing "
                        "the cores its share: oversubscribed threads slowed generation about 7x on 2 cores")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="benchmark JSON file (CounterFact, ZsRE, KnowEdit, MQuAKE, LEME); several files of one "
                        "schema are edited one after another, as one data set")
    p.add_argument("--dataset", choices=FAMILIES, default=None, help="check the file is of this family (default: detect)")
    p.add_argument("--schema", choices=sorted(PARSERS), default=None, help="force a schema (default: detect)")
    p.add_argument("--edits", type=int, required=True, help="number of cases edited (MQuAKE: cases, each with all its rewrites)")
    p.add_argument("--batch-size", type=int, default=1, help="cases per sequential batch")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate after every k-th batch (curves); 0: end only")
    p.add_argument("--output", required=True, help="output folder (results, plots, resume state)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop after the first batch that ends past this many minutes, its state saved, and exit 3; "
                        "the same command continues (a run of many hours in parts)")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="leave out (and log) records that fail the schema check instead of stopping")
    g = p.add_argument_group("hyperparameters (AlphaEdit and the baselines)")
    g.add_argument("--hparams", default=None, metavar="PATH",
                   help="yaml of the one listed method that takes hyperparameters and has no --method-hparams")
    g.add_argument("--method-hparams", nargs="+", action="extend", default=[], metavar="LABEL=PATH",
                   help="yaml of one method, e.g. MEMIT+P=hparams/MEMIT/smollm2-135m-projected.yaml (repeatable). "
                        "Default for --model smollm2: hparams/AlphaEdit/smollm2-135m.yaml, "
                        "hparams/<ALG>/smollm2-135m[-projected].yaml")
    g.add_argument("--corpus", default=None, help="mom2_dataset override (every method): a text file/folder or 'self'")
    g.add_argument("--samples", type=int, default=None, help="mom2_n_samples override")
    g.add_argument("--max-tokens", type=int, default=None, help="mom2_max_tokens override")
    g.add_argument("--stats-dir", default=None, help="statistics/projector cache folder override")
    e = p.add_argument_group("metrics")
    e.add_argument("--fluency", action="store_true", help="generate text for Fluency (and Consistency); slow on a CPU")
    e.add_argument("--generation-every-point", action="store_true",
                   help="also compute the generated-text metrics (Fluency, Consistency, MQuAKE CoT) at the "
                        "intermediate --eval-every points; by default only before editing and at the end")
    e.add_argument("--curve-sample", type=int, default=0, metavar="N",
                   help="score each curve point on N of the cases edited so far, spread evenly from the oldest "
                        "to the newest (0: all of them); the final figures score every edited case")
    e.add_argument("--perplexity", type=int, default=0, metavar="N",
                   help="perplexity at every point on N texts of the statistics corpus that the statistics leave "
                        "out (mom2_heldout_fraction); 0: off")
    e.add_argument("--null-space-curve", action="store_true",
                   help="at every point, how many directions of each edited layer's null space the edits so far "
                        "occupy and leave (methods with a null space)")
    e.add_argument("--fluency-prompts", type=int, default=1, help="generation prompts per case")
    e.add_argument("--generation-tokens", type=int, default=100, help="new tokens per Fluency/LEME generation")
    e.add_argument("--reference-snippets", default=None, help="ROME attribute_snippets.json for Consistency")
    e.add_argument("--host-evaluators", action="store_true",
                   help="KnowEdit: also score before editing and after the last batch with EasyEdit's own evaluators "
                        "(needs the EasyEdit source on PYTHONPATH), beside the plugin's figures")
    e.add_argument("--no-cot", action="store_true", help="MQuAKE: skip the chain-of-thought variant")
    e.add_argument("--general", nargs="*", default=None, choices=TASKS, metavar="TASK",
                   help=f"general-capability tasks before/after editing (no TASK: all of {', '.join(TASKS)})")
    e.add_argument("--glue-dir", default=None, help="folder of sst2.json, mmlu.json, ... (../shared/data/glue)")
    e.add_argument("--general-n", type=int, default=100, help="records per task (records 10.. as in AlphaEdit)")
    e.add_argument("--rte-mapping", choices=("glue", "repo"), default="glue",
                   help="'repo' reproduces AlphaEdit's inverted RTE target")
    e.add_argument("--representation", type=int, default=0, metavar="N",
                   help="hidden-representation shift on N factual prompts (0: off)")
    e.add_argument("--no-plots", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def hparams_by_method(args) -> Dict[str, str]:
    """The yaml of each listed method: its --method-hparams, else --hparams (if it is the only method left
    without one), else the shipped default for the model (smollm2). A method missing here gets an error
    naming the flag when it is created."""
    registered = set(available_methods())
    methods = [m for m in args.methods if m in registered]  # unknown names are reported by BenchConfig.validate
    chosen: Dict[str, str] = {}
    for item in args.method_hparams:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--method-hparams expects LABEL=PATH (e.g. MEMIT+P=hparams/MEMIT/smollm2-135m-projected."
                             f"yaml), got {item!r}")
        if label not in args.methods:
            raise ValueError(f"--method-hparams {item}: {label} is not one of --methods ({' '.join(args.methods)})")
        if label in chosen:
            raise ValueError(f"--method-hparams gives {label} twice ({chosen[label]} and {path})")
        if label in registered and not method_uses_hparams(label):
            raise ValueError(f"--method-hparams {item}: {label} takes no hyperparameters")
        chosen[label] = path
    if args.hparams is not None:
        open_methods = [m for m in methods if method_uses_hparams(m) and m not in chosen]
        if len(open_methods) != 1:
            which = f"{len(open_methods)} ({', '.join(open_methods)})" if open_methods else "none"
            raise ValueError(f"--hparams {args.hparams} is for exactly one method without --method-hparams, but "
                             f"{which} of --methods take hyperparameters; give each its own "
                             "--method-hparams LABEL=PATH")
        chosen[open_methods[0]] = args.hparams
    for method in methods:
        if method not in chosen and method_uses_hparams(method):
            default = default_hparams_path(method, args.model)
            if default is not None:
                chosen[method] = str(default)
                logger.info("%s: hyperparameters %s (the default for --model %s)", method, default, args.model)
    return chosen


def config_from_args(args, argv: Optional[List[str]] = None) -> BenchConfig:
    hparams = hparams_by_method(args)
    check_device(args.device, "--device")
    if args.dtype is not None:
        canonical_dtype(args.dtype, "--dtype")
    overrides = {k: v for k, v in {"mom2_dataset": args.corpus, "mom2_n_samples": args.samples,
                                   "mom2_max_tokens": args.max_tokens, "stats_dir": args.stats_dir,
                                   "device": args.device, "dtype": args.dtype}.items() if v is not None}
    if args.dtype is not None:
        overrides["fp16"] = canonical_dtype(args.dtype) == "float16"  # --dtype replaces a yaml's fp16 too
    options = {m: MethodOptions(hparams=hparams.get(m), overrides=overrides if m in hparams else {}, seed=args.seed)
               for m in args.methods}
    snippets = None
    if args.reference_snippets:
        from ..evaluation.counterfact import load_snippets

        snippets = load_snippets(args.reference_snippets)
    general = list(TASKS) if args.general == [] else (args.general or [])
    return BenchConfig(
        methods=args.methods, dataset=args.data[0] if len(args.data) == 1 else list(args.data), edits=args.edits,
        batch_size=args.batch_size, output=args.output,
        schema=args.schema, family=args.dataset, eval_every=args.eval_every, seed=args.seed, model_name=args.model,
        eval=EvalOptions(fluency=args.fluency, fluency_prompts=args.fluency_prompts,
                         generation_tokens=args.generation_tokens, cot=not args.no_cot, seed=args.seed,
                         snippets=snippets),
        general_tasks=general, glue_dir=args.glue_dir, general_n=args.general_n, rte_mapping=args.rte_mapping,
        representation_prompts=args.representation, plots=not args.no_plots,
        skip_bad_records=args.skip_bad_records,
        command=" ".join(shlex.quote(a) for a in ["alphaedit-bench", *(argv if argv is not None else sys.argv[1:])]),
        generation_at_curve_points=args.generation_every_point,
        curve_sample=args.curve_sample, perplexity_texts=args.perplexity, null_space_curve=args.null_space_curve,
        host_evaluators=args.host_evaluators, time_budget_minutes=args.time_budget,
        method_options=options, model_dtype=model_dtype(args, options), trust_remote_code=args.trust_remote_code,
    )


def model_dtype(args, options: Dict[str, MethodOptions]) -> str:
    """The dtype the model is loaded in: --dtype, else the one the methods' hparams agree on, else float32."""
    if args.dtype is not None:
        return canonical_dtype(args.dtype, "--dtype")
    wanted = {}
    for label, option in options.items():
        if option.hparams is not None and method_uses_hparams(label):
            hparams = load_method_hparams(label, option.hparams, option.overrides)
            if hparams.dtype is not None or hparams.fp16:
                wanted[label] = hparams.model_dtype
    if len(set(wanted.values())) > 1:
        listed = ", ".join(f"{label}: {dtype}" for label, dtype in wanted.items())
        raise ValueError(f"the methods' hparams ask for different model dtypes ({listed}); one model is edited by "
                         "all of them: pass --dtype")
    return next(iter(wanted.values()), "float32")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            logger.error("--threads must be >= 1, got %d", args.threads)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args, argv)
        results = run_benchmark(config, device=args.device)
    except BenchmarkPaused as error:
        logger.warning("%s", error)
        return 3
    except (DatasetError, BenchmarkError, ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    from .report import markdown_table

    print(markdown_table(results))
    print(f"results: {results['files']['json']}, {results['files']['markdown']}; plots: "
          + (", ".join(results["files"]["plots"]) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
