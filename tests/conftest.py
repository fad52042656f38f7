"""Tiny random models (GPT-2 Conv1D and Llama Linear) and a word-level tokenizer, built offline."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# ---------------------------------------------------------------------------
# The EasyEdit host: its current source (../shared/hosts/EasyEdit, or EASYEDIT_SOURCE) goes on sys.path
# before anything imports alphaedit_plugin, as its users run it; subprocesses inherit it by PYTHONPATH.
# Without it the host tests skip, saying why.
# ---------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
HOST_SOURCE = Path(os.environ.get("EASYEDIT_SOURCE") or ROOT.parent / "shared" / "hosts" / "EasyEdit")
HOST_MISSING = None if (HOST_SOURCE / "easyeditor" / "__init__.py").is_file() else (
    f"the EasyEdit source is not at {HOST_SOURCE} (../shared/hosts/EasyEdit, or set EASYEDIT_SOURCE to a "
    "checkout of https://github.com/zjunlp/EasyEdit)")
if HOST_MISSING is None and os.environ.get("ALPHAEDIT_TESTS_WITHOUT_HOST") != "1":
    if str(HOST_SOURCE) not in sys.path:
        sys.path.insert(0, str(HOST_SOURCE))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOST_SOURCE), str(ROOT),
                                                           os.environ.get("PYTHONPATH")) if p)

SUBJECTS = ["Paris", "Rome", "Berlin", "Madrid", "Eiffel", "Tower", "Colosseum", "Danielle", "Darrieux", "Obama",
            "Toyota", "Apple", "Google", "Nile", "Amazon", "Everest", "Einstein", "Newton", "Curie", "Tesla"]
WORDS = ["the", "The", "is", "in", "of", "a", "located", "city", "capital", "language", "speaks", "born",
         "mother", "tongue", "French", "English", "Italian", "German", "Spanish", "Japan", "France", "Italy",
         "Germany", "Spain", "river", "mountain", "company", "scientist", "famous", "and", "was", "by", "to",
         "Therefore", "Because", "I", "You", "He", "She", "It", "In", "A", "This", ".", ",", "made", "works", "for"]
VOCAB = ["<unk>", "<pad>", "<eos>"] + sorted(set(SUBJECTS + WORDS))


def assert_matches_recording(actual, expected, relative: float = 1e-4, msg=None):
    """A recorded float32 result, reproduced to float32 rounding rather than bit for bit: another CPU's vector
    units sum in another order (seen: differences of 1e-6 on updates and key sums recorded elsewhere), and the
    target search's steps carry that along. ``relative`` is of the recording's largest entry; a change of
    behaviour moves results by orders of magnitude more."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=relative, atol=relative * scale, msg=msg)


def make_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def build_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=64, n_embd=32, n_layer=4, n_head=4, initializer_range=0.2,
                        bos_token_id=2, eos_token_id=2, pad_token_id=1)
    return GPT2LMHeadModel(config).eval()


def build_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


BUILDERS = {"gpt2": build_gpt2, "llama": build_llama}


def write_corpus(path, n_lines: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(" ".join(rng.choice(VOCAB[3:]) for _ in range(rng.randint(8, 14))))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=sorted(BUILDERS))
def arch(request):
    return request.param


# ---------------------------------------------------------------------------
# Shared helpers of the unit/property suite (test_math, test_editing, test_cache, test_bad_input).
# ---------------------------------------------------------------------------

# The models are tiny: extra threads only add overhead and contend with whatever else runs on the machine.
torch.set_num_threads(1)

# Prompts whose subject is the last word, so that a change at the subject token reaches the prediction.
FACTS = [
    {"prompt": "The capital of France", "subject": "France", "target_new": "Rome"},
    {"prompt": "The mother tongue of Einstein", "subject": "Einstein", "target_new": "Japan"},
    {"prompt": "The river located in Spain", "subject": "Spain", "target_new": "Tesla"},
]


def make_hparams(tmp_path, arch: str, n_lines: int = 40, **overrides):
    """Hparams that work on the tiny models; the corpus has ``n_lines`` lines (40: full-rank statistics)."""
    from alphaedit_plugin import AlphaEditHyperParams

    fields = dict(layers=[1, 2], v_num_grad_steps=20, v_lr=0.5, clamp_norm_factor=10, v_weight_decay=1e-3, L2=0.1,
                  nullspace_threshold=1e-6, mom2_dataset=write_corpus(tmp_path / f"corpus{n_lines}.txt", n_lines),
                  mom2_n_samples=1000, stats_dir=str(tmp_path / "cache"), context_template_count=2,
                  context_template_length=3, model_name=f"tiny-{arch}")
    fields.update(overrides)
    return AlphaEditHyperParams(**fields)


def exact_hparams(tmp_path, arch: str, **overrides):
    """Rank-deficient statistics (4 lines, 46 tokens < MLP width), float64, nothing held out: an exact null space."""
    fields = dict(n_lines=4, mom2_dtype="float64", mom2_heldout_fraction=0.0, nullspace_threshold=1e-6)
    fields.update(overrides)
    return make_hparams(tmp_path, arch, **fields)


def corpus_texts(path) -> list:
    return [line.strip() for line in open(path, encoding="utf-8").read().splitlines() if line.strip()]


def weights_snapshot(model) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_weights_unchanged(model, snapshot: dict) -> None:
    current = model.state_dict()
    assert set(current) == set(snapshot)
    changed = [name for name, tensor in current.items() if not torch.equal(tensor, snapshot[name])]
    assert not changed, f"weights changed: {changed}"


@torch.no_grad()
def module_inputs(model, tok, module_name: str, texts) -> list:
    """Input of ``module_name`` at every token of each text (one unpadded forward per text): [(T, d_in)]."""
    module = model.get_submodule(module_name)
    captured = []
    handle = module.register_forward_pre_hook(lambda _module, args: captured.append(args[0][0].detach().clone()))
    try:
        for text in texts:
            model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    finally:
        handle.remove()
    return captured


def fact_key(model, tok, module_name: str, prompt: str, context_templates) -> torch.Tensor:
    """MEMIT/AlphaEdit key of a prompt whose subject is its last word: the module input at the last token,
    averaged within each group of context prefixes, then over the groups."""
    group_means = []
    for group in context_templates:
        rows = module_inputs(model, tok, module_name, [context.format(prompt) for context in group])
        group_means.append(torch.stack([row[-1] for row in rows]).mean(dim=0))
    return torch.stack(group_means).mean(dim=0)


@torch.no_grad()
def next_token_log_probs(model, tok, prompt: str) -> torch.Tensor:
    return model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].float().log_softmax(-1)


def token_id(tok, word: str) -> int:
    ids = tok(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and ids[0] != tok.unk_token_id, f"{word!r} is not one vocabulary word"
    return ids[0]


def mid_spectrum_threshold(moment: torch.Tensor, fraction: float = 0.5) -> float:
    """A threshold halfway (geometrically) between two neighbouring eigenvalues, about ``fraction`` up the spectrum."""
    eigenvalues = torch.linalg.eigvalsh(moment.double())
    k = max(0, min(len(eigenvalues) - 2, int(fraction * len(eigenvalues))))
    return float((eigenvalues[k].clamp_min(1e-30) * eigenvalues[k + 1]).sqrt())


# ---------------------------------------------------------------------------
# Tests with and without the EasyEdit host
# ---------------------------------------------------------------------------
HAS_HOST = importlib.util.find_spec("easyeditor") is not None
needs_host = pytest.mark.skipif(not HAS_HOST, reason=HOST_MISSING or "easyeditor is not importable here")


def require_host():
    """The ``easyeditor`` module, or a skip that says where the tests look for it."""
    return pytest.importorskip("easyeditor", reason=HOST_MISSING or "easyeditor is not importable here")


def run_without_host(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a fresh interpreter where easyeditor is not importable (the core alone, as on a
    machine without EasyEdit); the test checks its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), ALPHAEDIT_TESTS_WITHOUT_HOST="1",
               HF_HUB_OFFLINE="1")
    guard = ("import sys, importlib.util\n"
             "sys.path = [p for p in sys.path if 'hosts/EasyEdit' not in p]\n"
             "assert importlib.util.find_spec('easyeditor') is None, 'easyeditor is installed in this interpreter'\n")
    return subprocess.run([sys.executable, "-c", guard + code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


# ---------------------------------------------------------------------------
# The real model: one statistics cache for the whole run
# ---------------------------------------------------------------------------
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext" / "wiki.test.raw"
# The statistics of every test on SmolLM2: WikiText (200 texts of up to 256 tokens) where ../shared is here,
# else text the model samples itself.
SMOLLM2_CORPUS = (str(WIKITEXT), 200) if WIKITEXT.is_file() else ("self", 128)


@pytest.fixture(scope="session")
def smollm2_stats_dir(tmp_path_factory):
    """One statistics cache for every test on the real model in this run, the notebooks' included (shared by the
    pytest-xdist workers too: cache files are keyed, checked on load and written atomically)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "smollm2-stats"
    path.mkdir(exist_ok=True)
    return path


def use_smollm2_statistics(hparams, stats_dir):
    """The run's shared SmolLM2 statistics settings on ``hparams`` (see ``SMOLLM2_CORPUS``)."""
    hparams.mom2_dataset, hparams.mom2_n_samples = SMOLLM2_CORPUS
    hparams.stats_dir = str(stats_dir)
    return hparams
