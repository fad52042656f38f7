"""The sequential-editing benchmark (AlphaEdit's protocol) with resumable state in the output folder.

Protocol: the first ``edits`` cases of a dataset are edited in T = ⌈edits/B⌉
batches of B cases, one batch after another, into the same model (a case is
one fact, or all rewrites of an MQuAKE case). After the last batch every
edited case is evaluated; with ``eval_every = k`` the cases edited so far are
also evaluated after every k-th batch (the curves). Every method's curve
starts at 0 edits with the unedited model's scores on the cases to be edited
(``pre``: computed once per run, saved in reference.json and shared by all
methods). Each method starts from the same original weights.

Long runs: with ``curve_sample = n`` each curve point scores n of the cases
edited so far, spread evenly from the oldest to the newest, so that a curve of
thousands of edits stays affordable and its points alike; the final figures
still score every edited case. With ``perplexity_texts`` every point also has
the perplexity on held-out texts of the statistics corpus; with
``null_space_curve``, for a method with a null space, how many of its
directions the edits have left (:mod:`..null_space_capacity`).

Output folder::

    run.json                      settings of the run (a different run in the same folder is refused)
    reference.json                what was read from the unedited model (pre-edit scores, locality predictions)
    methods/<name>/checkpoint.pt  edited weights + progress after the last finished batch
    methods/<name>/state_b<t>/    the method's editing state after batch t (state.pt, an EditingState)
    methods/<name>/progress.json  the same progress and the method's settings, readable;
                                  "status": running | failed | complete
    results.json, results.md, *.png

Re-running the same command resumes every method from its last finished
batch; a complete method is not run again, and a method whose settings
(``describe()``, e.g. its hparams) changed since it started is refused.
Seeds: the global torch seed is set to ``seed + t`` before batch t and to
``seed`` before each evaluation, so a resumed run computes what an
uninterrupted one does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..evaluation import EvalOptions, ModelScorer, family_module, load_datasets
from ..evaluation.datasets import EditCase
from ..run_settings import canonical_dtype
from .methods import MethodOptions, available_methods, check_method_options, create_method

logger = logging.getLogger(__name__)
FORMAT = 2  # 2: one editing-state file format for every method


class BenchmarkError(RuntimeError):
    """The run cannot go on; what finished is saved in the output folder."""


class BenchmarkPaused(BenchmarkError):
    """The run stopped at its time budget after a saved batch; the same command continues it."""


@dataclass
class BenchConfig:
    methods: List[str]
    dataset: Union[str, List[str]]  # path of the benchmark file, or several files of one schema edited in order
    edits: int
    batch_size: int
    output: str
    schema: Optional[str] = None  # force a schema (default: detected)
    family: Optional[str] = None  # check the file belongs to this family
    eval_every: int = 0  # evaluate after every k-th batch as well (0: only after the last)
    seed: int = 0
    model_name: str = "custom"
    model_dtype: str = "float32"  # the dtype the model is loaded in (when run_benchmark loads it)
    trust_remote_code: bool = False
    eval: EvalOptions = field(default_factory=EvalOptions)
    general_tasks: List[str] = field(default_factory=list)  # e.g. ["sst2", "mmlu"]; empty: no general capability
    glue_dir: Optional[str] = None
    general_n: int = 100
    general_start: int = 10  # AlphaEdit scores records 10.. (the first ten are its few-shot pool)
    general_generation: bool = True
    rte_mapping: str = "glue"
    representation_prompts: int = 0  # 0: no representation-shift analysis
    representation_layer: Optional[int] = None
    method_options: Dict[str, MethodOptions] = field(default_factory=dict)
    plots: bool = True
    skip_bad_records: bool = False  # leave out (and log) records that fail the schema check
    command: Optional[str] = None  # the command line that started the run (recorded in the results)
    generation_at_curve_points: bool = False  # Fluency/CoT also at intermediate points (else: before and at the end)
    host_evaluators: bool = False  # KnowEdit: also score with EasyEdit's own evaluators (needs easyeditor)
    # Stop after the first batch (or curve point) that ends past this many minutes since the runner started, its state
    # saved: a run of many hours in parts (None: run to the end). Not part of the run's identity.
    time_budget_minutes: Optional[float] = None
    curve_sample: int = 0  # score each curve point on this many of the edited cases, spread evenly (0: all)
    perplexity_texts: int = 0  # held-out perplexity at every point on this many corpus texts (0: none)
    null_space_curve: bool = False  # the null-space directions the edits have left, at every point

    def validate(self) -> None:
        if not self.methods:
            raise ValueError("no methods given; registered: " + ", ".join(available_methods()))
        unknown = [m for m in self.methods if m not in available_methods()]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; registered: {', '.join(available_methods())}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods listed twice: {self.methods}")
        if self.edits < 1 or self.batch_size < 1:
            raise ValueError(f"edits ({self.edits}) and batch_size ({self.batch_size}) must be at least 1")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.time_budget_minutes is not None and not self.time_budget_minutes > 0:
            raise ValueError(f"time budget must be a number of minutes > 0, got {self.time_budget_minutes}")
        for name in ("curve_sample", "perplexity_texts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        if self.general_tasks and not self.glue_dir:
            raise ValueError("general capability tasks given without glue_dir (the folder of sst2.json, mmlu.json, ...)")

    def identity(self, dataset_sha: str) -> Dict[str, Any]:
        """Everything that changes the numbers; a saved run with another identity is refused."""
        return {
            "format": FORMAT, "dataset_sha256": dataset_sha, "schema": self.schema, "edits": self.edits,
            "batch_size": self.batch_size, "eval_every": self.eval_every, "seed": self.seed,
            "model": self.model_name, "eval": self.eval.as_dict(), "general_tasks": list(self.general_tasks),
            "general_n": self.general_n, "general_start": self.general_start, "general_generation": self.general_generation,
            "rte_mapping": self.rte_mapping, "representation_prompts": self.representation_prompts,
            "representation_layer": self.representation_layer,
            "skip_bad_records": self.skip_bad_records,
            "generation_at_curve_points": self.generation_at_curve_points,
            "host_evaluators": self.host_evaluators,
            # only where set, so that the folders of runs made before these options still resume
            **({"curve_sample": self.curve_sample} if self.curve_sample else {}),
            **({"perplexity_texts": self.perplexity_texts} if self.perplexity_texts else {}),
            **({"null_space_curve": True} if self.null_space_curve else {}),
        }


# ---------------------------------------------------------------------------
# Small file helpers (atomic writes: a crash never leaves a half-written file)
# ---------------------------------------------------------------------------

def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def dataset_paths(dataset: Union[str, Path, Sequence[Union[str, Path]]]) -> List[str]:
    """``BenchConfig.dataset`` as a list of file paths."""
    return [str(dataset)] if isinstance(dataset, (str, Path)) else [str(p) for p in dataset]


def _sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _requests(cases: Sequence[EditCase]) -> List[Dict[str, Any]]:
    return [request for case in cases for request in case.requests]


def _plain(data: Any) -> Any:
    """``data`` as it reads back from JSON (so saved and fresh settings compare equal)."""
    return json.loads(json.dumps(data, default=str))


def _differing(saved: Any, current: Any, prefix: str = "") -> List[str]:
    """Dotted names of the entries that differ between two nested dicts."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [name for key in sorted(set(saved) | set(current), key=str)
                for name in _differing(saved.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if saved == current else [prefix.rstrip(".") or "(all)"]


def start_point(reference: Dict[str, Any]) -> Dict[str, Any]:
    """The curve point at 0 edits: the unedited model's scores (``reference.json``'s ``pre``), shared by all methods."""
    point = {"edits": 0, "metrics": reference["pre"], "general": reference.get("general_pre")}
    if reference.get("perplexity_pre") is not None:
        point["perplexity"] = reference["perplexity_pre"]
    return point


def spread_indices(edited: int, sample: int) -> List[int]:
    """``sample`` of the indices ``0 .. edited-1``, evenly spread from the oldest to the newest (all of them where
    ``sample`` is 0 or at least ``edited``)."""
    if not sample or sample >= edited:
        return list(range(edited))
    return [(2 * i + 1) * edited // (2 * sample) for i in range(sample)]


def _with_start(curve: List[Dict[str, Any]], reference: Dict[str, Any]) -> List[Dict[str, Any]]:
    return curve if curve and curve[0]["edits"] == 0 else [start_point(reference)] + list(curve)


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------

class BenchmarkRunner:
    def __init__(self, config: BenchConfig, model, tok):
        config.validate()
        self.config, self.model, self.tok = config, model, tok
        self.started = time.monotonic()  # for the time budget
        self.out = Path(config.output).expanduser()
        self.scorer = ModelScorer(model, tok)
        self.dataset_paths = dataset_paths(config.dataset)
        self.dataset = load_datasets(self.dataset_paths, schema=config.schema, family=config.family,
                                     skip_bad_records=config.skip_bad_records)
        self.cases = self.dataset.take(config.edits)
        self.family = family_module(self.dataset.family)
        self.batches = math.ceil(len(self.cases) / config.batch_size)
        self.host_fluency_missing: Optional[str] = None  # why EasyEdit's evaluators cannot score Fluency here
        if config.host_evaluators:
            self._check_host_evaluators()

    def _check_host_evaluators(self) -> None:
        import importlib.util

        if self.dataset.family != "knowedit":
            raise BenchmarkError(f"--host-evaluators scores KnowEdit runs; {self.dataset.path} is a "
                                 f"{self.dataset.family} file")
        if importlib.util.find_spec("easyeditor") is None:
            raise BenchmarkError("--host-evaluators needs EasyEdit's evaluators: put the EasyEdit source on "
                                 "PYTHONPATH (e.g. PYTHONPATH=../shared/hosts/EasyEdit)")
        if self.config.eval.fluency:
            from ..evaluation.knowedit import host_fluency_unavailable

            self.host_fluency_missing = host_fluency_unavailable()
            if self.host_fluency_missing:
                logger.warning("EasyEdit's evaluators will score no Fluency: %s. The plugin's own Fluency (the "
                               "same n-gram entropy, no NLTK data needed) is scored as usual",
                               self.host_fluency_missing)

    # -- set-up ---------------------------------------------------------------
    def _check_output(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        identity = self.config.identity("+".join(_sha256(path) for path in self.dataset_paths))
        identity["schema"] = self.dataset.schema
        identity["model_dtype"] = canonical_dtype(next(self.model.parameters()).dtype, "the model's dtype")
        run_file = self.out / "run.json"
        if run_file.exists():
            saved = read_json(run_file).get("identity")
            if isinstance(saved, dict) and "model_dtype" not in saved:
                saved = {**saved, "model_dtype": "float32"}  # runners before --dtype loaded float32 only
            if saved != identity:
                differing = sorted(k for k in set(saved or {}) | set(identity) if (saved or {}).get(k) != identity.get(k))
                raise BenchmarkError(f"{self.out} holds a run with other settings ({', '.join(differing)}); "
                                     "use another --output folder, or delete that one to start over")
        write_json(run_file, {"identity": identity, "dataset": self.dataset.path, "methods": self.config.methods})

    def _evaluate(self, cases, reference, curve_point: bool = False) -> Dict[str, Any]:
        """The family's metrics; at intermediate curve points without generated-text metrics (Fluency,
        Consistency, MQuAKE CoT) unless ``generation_at_curve_points``: those dominate the cost."""
        options = self.config.eval
        if curve_point and not self.config.generation_at_curve_points:
            options = copy.copy(options)
            options.fluency, options.cot = False, False
        torch.manual_seed(self.config.seed)
        return self.family.evaluate(self.scorer, cases, reference, options)

    def _host_figures(self, host_reference) -> Dict[str, Any]:
        """KnowEdit figures of the model as it is now, from EasyEdit's own evaluators (per-case figures dropped)."""
        from ..evaluation import knowedit

        torch.manual_seed(self.config.seed)
        missing = self.host_fluency_missing
        figures = knowedit.host_evaluate(self.model, self.tok, self.cases, host_reference,
                                         fluency=self.config.eval.fluency and not missing, seed=self.config.seed)
        figures.pop("cases", None)
        if missing:
            figures["notes"] = [f"EasyEdit's Fluency not scored: {missing}"]
        return figures

    def _point(self, method, edited: int, reference: Dict[str, Any], general=None,
               final: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """A curve point after ``edited`` edits: the metrics of the curve sample of the cases edited so far (or
        ``final``'s where that sample is all of them), held-out perplexity and the null space left."""
        indices = spread_indices(edited, self.config.curve_sample)
        if final is not None and len(indices) == edited:
            metrics = final
        else:
            metrics = self._evaluate([self.cases[i] for i in indices],
                                     [reference["reference"][i] for i in indices], curve_point=True)
        point: Dict[str, Any] = {"edits": edited, "metrics": metrics,
                                 "general": self._general() if general is None else general}
        if len(indices) < edited:
            point["scored_cases"] = len(indices)
        if reference.get("perplexity_texts"):
            point["perplexity"] = self._perplexity(reference)
        capacity = method.capacity() if self.config.null_space_curve else None
        if capacity:
            point["null_space"] = capacity
        return point

    def _perplexity(self, reference: Dict[str, Any]) -> float:
        from ..evaluation.perplexity import perplexity

        return perplexity(self.model, self.tok, reference["perplexity_texts"])

    def _perplexity_sequences(self) -> List[List[int]]:
        """The held-out texts of the methods' statistics corpus (one corpus setting for every method)."""
        from ..evaluation.perplexity import heldout_sequences
        from .methods import load_method_hparams, method_uses_hparams

        settings: Dict[tuple, Any] = {}
        for name in self.config.methods:
            if not method_uses_hparams(name):
                continue
            options = self.config.method_options.get(name) or MethodOptions(seed=self.config.seed)
            hparams = load_method_hparams(name, options.hparams, options.overrides)
            key = (str(hparams.mom2_dataset), hparams.mom2_n_samples, hparams.mom2_max_tokens, hparams.seed,
                   hparams.mom2_heldout_fraction)
            settings.setdefault(key, (name, hparams))
        if not settings:
            raise BenchmarkError("perplexity_texts needs a method with statistics settings (mom2_dataset ...) to "
                                 "take held-out texts from; every listed method has none")
        if len(settings) > 1:
            raise BenchmarkError("perplexity_texts needs one statistics corpus for every method, but the methods "
                                 "differ in (mom2_dataset, mom2_n_samples, mom2_max_tokens, seed, "
                                 "mom2_heldout_fraction): " + "; ".join(f"{n}: {k}" for k, (n, _) in settings.items()))
        name, hparams = next(iter(settings.values()))
        try:
            return heldout_sequences(self.model, self.tok, hparams, self.config.perplexity_texts)
        except ValueError as error:
            raise BenchmarkError(f"{name}: {error}") from error

    def _general(self) -> Optional[Dict[str, Any]]:
        if not self.config.general_tasks:
            return None
        from ..evaluation.glue import evaluate_general

        torch.manual_seed(self.config.seed)
        return evaluate_general(self.scorer, self.config.glue_dir, self.config.general_tasks, n=self.config.general_n,
                                start=self.config.general_start, generation=self.config.general_generation, rte_mapping=self.config.rte_mapping)

    def _representation_prompts(self) -> List[str]:
        """Prompts of the cases after the edited ones (facts the edits should leave alone); else the edited ones."""
        n = self.config.representation_prompts
        others = self.dataset.cases[self.config.edits:self.config.edits + n]
        pool = others if len(others) >= min(n, 3) else self.dataset.cases[:n]
        return [c.requests[0]["prompt"].format(c.requests[0]["subject"]) for c in pool]

    def _hidden(self, prompts):
        from ..evaluation.representation import hidden_states

        return hidden_states(self.model, self.tok, prompts, self.config.representation_layer)

    def _reference(self) -> Dict[str, Any]:
        path = self.out / "reference.json"
        if path.exists():
            logger.info("using the unedited model's scores saved in %s", path)
            return read_json(path)
        logger.info("scoring the unedited model on %d cases", len(self.cases))
        torch.manual_seed(self.config.seed)
        reference = self.family.reference(self.scorer, self.cases, self.config.eval)
        data = {"reference": reference, "pre": self._evaluate(self.cases, reference), "general_pre": self._general()}
        if self.config.perplexity_texts:
            data["perplexity_texts"] = self._perplexity_sequences()
            data["perplexity_pre"] = self._perplexity(data)
            logger.info("held-out perplexity of the unedited model on %d texts: %.2f", len(data["perplexity_texts"]),
                        data["perplexity_pre"])
        if self.config.host_evaluators:
            from ..evaluation import knowedit

            logger.info("scoring the unedited model with EasyEdit's evaluators")
            data["host_reference"] = knowedit.host_reference(self.model, self.tok, self.cases)
            data["pre_host"] = self._host_figures(data["host_reference"])
        if self.config.representation_prompts:
            prompts = self._representation_prompts()
            data["representation"] = {"prompts": prompts, "before": self._hidden(prompts).tolist()}
        write_json(path, data)
        return data

    # -- one method -------------------------------------------------------------
    def _run_method(self, name: str, reference: Dict[str, Any]) -> Dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.config
        folder = self.out / "methods" / name
        folder.mkdir(parents=True, exist_ok=True)
        progress_file, checkpoint_file = folder / "progress.json", folder / "checkpoint.pt"
        if progress_file.exists():
            saved = read_json(progress_file)
            if saved.get("status") == "complete":
                logger.info("%s: complete in %s; not run again", name, folder)
                result = saved["result"]
                result["curve"] = _with_start(result["curve"], reference)  # a result saved without the 0-edit point
                return result
        options = cfg.method_options.get(name) or MethodOptions(seed=cfg.seed)
        method = create_method(name, self.model, self.tok, options)
        params = dict(self.model.named_parameters())
        names = method.edited_parameters()
        missing = [n for n in names if n not in params]
        if missing:
            raise BenchmarkError(f"{name}: edited_parameters() names parameters the model lacks: {missing}")
        originals = {n: params[n].detach().clone() for n in names}
        settings = _plain(method.describe())

        progress = {"status": "running", "batches_done": 0, "curve": [], "edit_seconds": 0.0, "state_dir": None,
                    "settings": settings}
        if checkpoint_file.exists():
            checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
            progress = json.loads(checkpoint["progress"])
            if "settings" in progress and progress["settings"] != settings:
                raise BenchmarkError(
                    f"{name}: {folder} holds batches edited with other settings "
                    f"({', '.join(_differing(progress['settings'], settings))}); use the same hyperparameters, "
                    f"another --output folder, or delete {folder} to start {name} over")
            progress["settings"] = settings
            if progress["state_dir"]:  # first: a method may make its state again from the unedited model
                method.load_state(folder / progress["state_dir"])
            with torch.no_grad():
                for n, tensor in checkpoint["weights"].items():
                    params[n].copy_(tensor.to(params[n].device, params[n].dtype))
            logger.info("%s: resuming after batch %d of %d (%d edits done)", name, progress["batches_done"],
                        self.batches, min(progress["batches_done"] * cfg.batch_size, len(self.cases)))
        else:
            started = time.perf_counter()
            method.prepare()
            progress["prepare_seconds"] = time.perf_counter() - started

        def save(batches_done: int) -> None:
            state_dir = f"state_b{batches_done}"
            staging = folder / (state_dir + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            method.save_state(staging)
            shutil.rmtree(folder / state_dir, ignore_errors=True)
            os.replace(staging, folder / state_dir)
            progress.update(batches_done=batches_done, state_dir=state_dir, status="running",
                            peak_memory_mb=larger_peaks(progress.get("peak_memory_mb"), peak_memory_mb(self.model)))
            tmp = checkpoint_file.with_name("checkpoint.pt.tmp")
            torch.save({"weights": {n: params[n].detach().cpu() for n in names}, "progress": json.dumps(progress)}, tmp)
            os.replace(tmp, checkpoint_file)
            write_json(progress_file, progress)
            for old in folder.glob("state_b*"):
                if old.name != state_dir:
                    shutil.rmtree(old, ignore_errors=True)

        try:
            done_edits = min(progress["batches_done"] * cfg.batch_size, len(self.cases))
            bar = tqdm(total=len(self.cases), initial=done_edits, unit="edit", desc=name, dynamic_ncols=True)
            with bar:
                for t in range(progress["batches_done"], self.batches):
                    batch = self.cases[t * cfg.batch_size:(t + 1) * cfg.batch_size]
                    torch.manual_seed(cfg.seed + t)
                    began = time.perf_counter()
                    try:
                        method.edit(_requests(batch))
                    except Exception as error:
                        progress.update(status="failed", failed_batch=t + 1,
                                        error=f"{type(error).__name__}: {error}")
                        write_json(progress_file, progress)
                        raise BenchmarkError(
                            f"{name}: batch {t + 1} of {self.batches} (records {batch[0].index}..{batch[-1].index} of "
                            f"{self.dataset.path}) failed: {type(error).__name__}: {error}. The {t} finished batch(es) "
                            f"are saved in {folder}; run the same command again to resume") from error
                    progress["edit_seconds"] += time.perf_counter() - began
                    bar.update(len(batch))
                    edited = min((t + 1) * cfg.batch_size, len(self.cases))
                    bar.set_postfix(batch=f"{t + 1}/{self.batches}",
                                    s_per_edit=f"{progress['edit_seconds'] / max(1, edited):.2f}")  # all batches
                    if cfg.eval_every and (t + 1) % cfg.eval_every == 0 and t + 1 < self.batches:
                        point = self._point(method, edited, reference)
                        progress["curve"].append(point)
                        logger.info("%s after %d edits: %s%s", name, edited, _headline(point["metrics"], self.family),
                                    f", held-out perplexity {point['perplexity']:.2f}" if "perplexity" in point else "")
                    save(t + 1)
                    if t + 1 < self.batches:
                        self._pause_if_over_budget(name, t + 1, folder)

            final = self._evaluate(self.cases, reference["reference"])
            result: Dict[str, Any] = {
                "method": name, "edits": len(self.cases), "batches": self.batches, "batch_size": cfg.batch_size,
                "final": final, "general": self._general(),
                "seconds_per_edit": progress["edit_seconds"] / len(self.cases) if progress["edit_seconds"] else 0.0,
                "prepare_seconds": progress.get("prepare_seconds"), "settings": method.describe(),
                # the largest over the processes that ran its batches (a resumed run spans several)
                "peak_memory_mb": larger_peaks(progress.get("peak_memory_mb"), peak_memory_mb(self.model)),
            }
            if cfg.host_evaluators:
                result["final_host"] = self._host_figures(reference["host_reference"])
            preservation = method.preservation(originals)
            if preservation:
                result["preservation"] = preservation  # of the accumulated update, per layer
            last = self._point(method, len(self.cases), reference, general=result["general"], final=final)
            result["curve"] = [start_point(reference)] + progress["curve"] + [last]
            if "perplexity" in last:
                result["perplexity"] = last["perplexity"]
            if cfg.representation_prompts and reference.get("representation"):
                import numpy as np

                from ..evaluation.representation import shift_figures

                before = np.array(reference["representation"]["before"])
                after = self._hidden(reference["representation"]["prompts"])
                np.save(folder / "representation_after.npy", after)
                result["representation"] = shift_figures(before, after)
            progress.update(status="complete", result=result)
            write_json(progress_file, progress)
            return result
        finally:
            with torch.no_grad():  # the next method starts from the original weights
                for n, tensor in originals.items():
                    params[n].copy_(tensor)

    def _pause_if_over_budget(self, name: str, batches_done: int, folder: Path) -> None:
        budget = self.config.time_budget_minutes
        if budget is None or time.monotonic() - self.started < 60 * budget:
            return
        raise BenchmarkPaused(f"{name}: paused after batch {batches_done} of {self.batches} (the time budget of "
                              f"{budget:g} minutes is spent); the finished batches are saved in {folder}; run the "
                              "same command again to continue")

    # -- everything ---------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        self._check_output()
        reference = self._reference()
        results: Dict[str, Any] = {
            "model": self.config.model_name,
            "dataset": {"path": self.dataset.path, "schema": self.dataset.schema, "family": self.dataset.family,
                        "skipped_records": self.dataset.skipped},
            "protocol": {"edits": len(self.cases), "batch_size": self.config.batch_size, "batches": self.batches,
                         "eval_every": self.config.eval_every, "seed": self.config.seed},
            "eval_options": self.config.eval.as_dict(),
            "headline": list(self.family.HEADLINE),
            "pre": reference["pre"], "general_pre": reference.get("general_pre"),
            **({"perplexity_pre": reference["perplexity_pre"]} if "perplexity_pre" in reference else {}),
            **({"pre_host": reference.get("pre_host")} if self.config.host_evaluators else {}),
            "command": self.config.command,
            "machine": machine_description(self.model),
            "methods": {},
        }
        for name in self.config.methods:
            results["methods"][name] = self._run_method(name, reference)
        peaks = peak_memory_mb(self.model)
        for result in results["methods"].values():
            peaks = larger_peaks(peaks, result.get("peak_memory_mb"))
        results["peak_memory_mb"] = peaks  # the whole run's, over every process that worked on it
        from .report import write_reports

        write_reports(results, self.out, reference=reference, plots=self.config.plots)
        return results


def machine_description(model) -> Dict[str, Any]:
    """Where the run happened (timings mean little without it)."""
    import platform

    device = next(model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "platform": platform.platform()}


def peak_memory_mb(model) -> Dict[str, float]:
    """The process's peak resident memory so far and, on a GPU, torch's peak allocation (MB)."""
    import resource

    peak = {"process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    device = next(model.parameters()).device
    if device.type == "cuda":
        peak["cuda_allocated"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak


def larger_peaks(first: Optional[Dict[str, float]], second: Optional[Dict[str, float]]) -> Dict[str, float]:
    """Per figure, the larger of two peak-memory records (either may be missing)."""
    first, second = first or {}, second or {}
    return {key: max(v for v in (first.get(key), second.get(key)) if v is not None)
            for key in sorted(set(first) | set(second))}


def _headline(metrics: Dict[str, Any], family) -> str:
    return ", ".join(f"{k} {metrics[k]:.1f}" for k in family.HEADLINE if isinstance(metrics.get(k), (int, float)))


def run_benchmark(config: BenchConfig, model=None, tok=None, device: str = "cpu") -> Dict[str, Any]:
    """Run (or resume) the benchmark; with no ``model``/``tok``, ``config.model_name`` is loaded
    (``smollm2`` or a local checkpoint folder)."""
    if model is None or tok is None:
        from ..models import load_model

        config.validate()  # bad settings, hyperparameters or data fail before the (slow) model load
        for name in config.methods:
            check_method_options(name, config.method_options.get(name) or MethodOptions(seed=config.seed))
        load_datasets(dataset_paths(config.dataset), schema=config.schema, family=config.family,
                      skip_bad_records=config.skip_bad_records).take(config.edits)

        model, tok = load_model(config.model_name, device=device, dtype=config.model_dtype,
                                trust_remote_code=config.trust_remote_code, field="--model")
    return BenchmarkRunner(config, model, tok).run()
