"""The on-disk cache of statistics and projectors: reuse, refusal of foreign or damaged files, location, resume."""

import os
from pathlib import Path

import pytest
import torch

from conftest import BUILDERS, corpus_texts, make_hparams, mid_spectrum_threshold, module_inputs
from alphaedit_plugin import create_state
from alphaedit_plugin import cache, layer_statistics, second_moment
from alphaedit_plugin.architectures import templates_for
from alphaedit_plugin.cache import CacheMismatchError, CorruptCacheError


def thresholds(model, tok, hparams, fractions):
    """Thresholds from the spectrum of the (approximate, all-lines) second moment at the first edited layer."""
    name = templates_for(model, hparams).rewrite_module_tmp.format(hparams.layers[0])
    keys = torch.cat(module_inputs(model, tok, name, corpus_texts(hparams.mom2_dataset))).double()
    return [mid_spectrum_threshold(keys.T @ keys / len(keys), f) for f in fractions]


def forbid_statistics(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the statistics were recomputed instead of read from the cache")
    monkeypatch.setattr(layer_statistics, "collect_second_moments", refuse)
    monkeypatch.setattr(layer_statistics, "corpus_token_sequences", refuse)


def cache_files(root: Path, kind: str):
    """kind: 'projector', 'statistics' or 'partial'."""
    files = sorted(p for p in root.rglob("*.pt"))
    if kind == "projector":
        return [p for p in files if p.parent.name == "projectors"]
    if kind == "partial":
        return [p for p in files if p.name.startswith("partial__")]
    return [p for p in files if p.parent.name != "projectors" and not p.name.startswith("partial__")]


def file_for(files, model, hparams, layer):
    module = cache.slug(templates_for(model, hparams).rewrite_module_tmp.format(layer))
    matching = [p for p in files if p.name.startswith(module + "__")]
    assert len(matching) == 1, (module, files)
    return matching[0]


@pytest.fixture
def setup(tmp_path, arch, tokenizer):
    model = BUILDERS[arch]()
    probe = make_hparams(tmp_path, arch)
    low, high = thresholds(model, tokenizer, probe, [0.3, 0.7])
    return model, probe, low, high


# ---------------------------------------------------------------------------
# reuse
# ---------------------------------------------------------------------------

def test_second_run_reuses_the_cache(setup, tmp_path, arch, tokenizer, monkeypatch):
    model, _, low, _ = setup
    hparams = make_hparams(tmp_path, arch, nullspace_threshold=low)
    first = create_state(model, tokenizer, hparams)
    assert len(cache_files(Path(hparams.stats_dir), "projector")) == 2
    assert len(cache_files(Path(hparams.stats_dir), "statistics")) == 2
    forbid_statistics(monkeypatch)
    second = create_state(model, tokenizer, hparams)
    for layer in hparams.layers:
        a, b = first.null_spaces[layer], second.null_spaces[layer]
        assert torch.equal(a.projector, b.projector)
        assert (a.rank, a.token_count) == (b.rank, b.token_count)
        assert torch.equal(a.heldout_keys, b.heldout_keys)


def test_new_threshold_reuses_the_statistics(setup, tmp_path, arch, tokenizer, monkeypatch):
    model, _, low, high = setup
    first = create_state(model, tokenizer, make_hparams(tmp_path, arch, nullspace_threshold=low))
    forbid_statistics(monkeypatch)
    hparams = make_hparams(tmp_path, arch, nullspace_threshold=high)
    second = create_state(model, tokenizer, hparams)
    root = Path(hparams.stats_dir)
    assert len(cache_files(root, "projector")) == 4  # a second projector file per layer, the first one kept
    for layer in hparams.layers:
        moment = torch.load(file_for(cache_files(root, "statistics"), model, hparams, layer), weights_only=True)["moment"]
        eigenvalues = torch.linalg.eigvalsh(moment.double())
        assert second.null_spaces[layer].rank == int((eigenvalues < high).sum())
        assert first.null_spaces[layer].rank == int((eigenvalues < low).sum())
    assert second.null_spaces[1].rank > first.null_spaces[1].rank


def test_thresholds_equal_to_six_digits_get_their_own_projectors(setup, tmp_path, arch, tokenizer):
    model, _, low, _ = setup
    create_state(model, tokenizer, make_hparams(tmp_path, arch, nullspace_threshold=low))
    nearly = low * (1 + 1e-9)  # e.g. 0.3 and 0.1 * 3
    assert nearly != low and f"{nearly:g}" == f"{low:g}"
    state = create_state(model, tokenizer, make_hparams(tmp_path, arch, nullspace_threshold=nearly))
    assert state.identity["nullspace_threshold"] == nearly


# ---------------------------------------------------------------------------
# foreign and damaged files
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["projector", "statistics"])
def test_file_with_another_key_is_refused(setup, tmp_path, arch, tokenizer, kind):
    model, _, low, _ = setup
    hparams = make_hparams(tmp_path, arch, nullspace_threshold=low)
    create_state(model, tokenizer, hparams)
    root = Path(hparams.stats_dir)
    if kind == "statistics":
        for path in cache_files(root, "projector"):
            path.unlink()
    path = file_for(cache_files(root, kind), model, hparams, hparams.layers[0])
    stored = torch.load(path, weights_only=True)
    foreign_key = {**stored.pop("key"), "n_samples": 12345}
    cache.save_keyed(path, foreign_key, stored)
    with pytest.raises(CacheMismatchError) as caught:
        create_state(model, tokenizer, hparams)
    assert "n_samples" in str(caught.value) and path.name in str(caught.value)


def test_tampered_key_is_refused(setup, tmp_path, arch, tokenizer):
    model, _, low, _ = setup
    hparams = make_hparams(tmp_path, arch, nullspace_threshold=low)
    create_state(model, tokenizer, hparams)
    path = file_for(cache_files(Path(hparams.stats_dir), "projector"), model, hparams, hparams.layers[-1])
    stored = torch.load(path, weights_only=True)
    stored["key"]["threshold"] = low * 10  # as if computed with another threshold
    torch.save(stored, path)
    with pytest.raises(CacheMismatchError, match="threshold"):
        create_state(model, tokenizer, hparams)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no key"])
def test_corrupted_file_is_refused(setup, tmp_path, arch, tokenizer, damage):
    model, _, low, _ = setup
    hparams = make_hparams(tmp_path, arch, nullspace_threshold=low)
    create_state(model, tokenizer, hparams)
    path = file_for(cache_files(Path(hparams.stats_dir), "projector"), model, hparams, hparams.layers[0])
    if damage == "garbage":
        path.write_bytes(os.urandom(64) + b"\x00not a torch file\xff" * 20)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({"projector": torch.eye(3)}, path)
    with pytest.raises(CorruptCacheError) as caught:
        create_state(model, tokenizer, hparams)
    assert path.name in str(caught.value)


# ---------------------------------------------------------------------------
# where the cache lives
# ---------------------------------------------------------------------------

@pytest.fixture
def environment(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("ALPHAEDIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.chdir(work)
    return home, work


def test_cache_root_precedence(environment, tmp_path, monkeypatch):
    home, work = environment
    assert cache.cache_root(None) == (home / ".cache" / "alphaedit").resolve()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root(None) == (tmp_path / "xdg" / "alphaedit").resolve()
    monkeypatch.setenv("ALPHAEDIT_CACHE", str(tmp_path / "env"))
    assert cache.cache_root(None) == (tmp_path / "env").resolve()
    assert cache.cache_root(str(tmp_path / "explicit")) == (tmp_path / "explicit").resolve()
    monkeypatch.setenv("ALPHAEDIT_CACHE", "")  # empty means unset
    assert cache.cache_root(None) == (tmp_path / "xdg" / "alphaedit").resolve()


@pytest.mark.parametrize("variables", [{"ALPHAEDIT_CACHE": "env"}, {"XDG_CACHE_HOME": "xdg"}, {}])
def test_create_state_writes_where_resolved_and_never_in_the_working_directory(environment, tmp_path, arch,
                                                                              tokenizer, monkeypatch, variables):
    home, work = environment
    for name, folder in variables.items():
        monkeypatch.setenv(name, str(tmp_path / folder))
    expected = {"ALPHAEDIT_CACHE": tmp_path / "env", "XDG_CACHE_HOME": tmp_path / "xdg" / "alphaedit"}.get(
        next(iter(variables), None), home / ".cache" / "alphaedit")
    hparams = make_hparams(tmp_path, arch, stats_dir=None, nullspace_threshold=1e9)
    create_state(BUILDERS[arch](), tokenizer, hparams)
    assert len(cache_files(expected, "projector")) == 2
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_unusable_xdg_cache_home_is_ignored(environment, xdg, monkeypatch):
    home, work = environment
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    root = cache.cache_root(None)
    assert work.resolve() not in [root, *root.parents]
    assert root == (home / ".cache" / "alphaedit").resolve()


# ---------------------------------------------------------------------------
# resuming an interrupted statistics pass
# ---------------------------------------------------------------------------

class CountingBlock:
    """Counts forward passes through block 0 and raises on the ``fail_on``-th (1-based), if given."""

    def __init__(self, model, hparams, fail_on=None):
        self.calls, self.fail_on = 0, fail_on
        block = model.get_submodule(templates_for(model, hparams).layer_module_tmp.format(0))
        self.handle = block.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError("simulated interruption")

    def remove(self):
        self.handle.remove()


def resume_hparams(tmp_path, arch, folder):
    # 1200 texts (~13k tokens) make several batches of at most second_moment.TOKENS_PER_BATCH tokens; no
    # context prefixes, so that every forward pass create_state makes is one batch of the statistics.
    return make_hparams(tmp_path, arch, n_lines=1200, mom2_n_samples=5000, nullspace_threshold=1e9,
                        context_template_count=0, stats_dir=str(tmp_path / folder))


def statistics_of(model, hparams):
    root = Path(hparams.stats_dir)
    return {layer: torch.load(file_for(cache_files(root, "statistics"), model, hparams, layer), weights_only=True)
            for layer in hparams.layers}


@pytest.mark.parametrize("damage_checkpoint", [False, True])
def test_statistics_resume_from_a_checkpoint(tmp_path, arch, tokenizer, monkeypatch, damage_checkpoint):
    model = BUILDERS[arch]()
    reference = resume_hparams(tmp_path, arch, "reference")
    counter = CountingBlock(model, reference)
    create_state(model, tokenizer, reference)
    counter.remove()
    total = counter.calls
    assert total >= 3, f"precondition: the corpus should make several batches, got {total}"

    monkeypatch.setattr(second_moment, "CHECKPOINT_SECONDS", 0.0)
    hparams = resume_hparams(tmp_path, arch, "interrupted")
    failing = CountingBlock(model, hparams, fail_on=3)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        create_state(model, tokenizer, hparams)
    failing.remove()
    root = Path(hparams.stats_dir)
    assert cache_files(root, "statistics") == [] and cache_files(root, "projector") == []
    [partial] = cache_files(root, "partial")
    if damage_checkpoint:
        partial.write_bytes(b"\x00damaged checkpoint")

    counter = CountingBlock(model, hparams)
    state = create_state(model, tokenizer, hparams)
    counter.remove()
    # Two batches were done before the interruption; a damaged checkpoint means starting over.
    assert counter.calls == (total if damage_checkpoint else total - 2)
    assert cache_files(root, "partial") == []

    expected, resumed = statistics_of(model, reference), statistics_of(model, hparams)
    for layer in hparams.layers:
        assert resumed[layer]["count"] == expected[layer]["count"]
        assert torch.allclose(resumed[layer]["moment"], expected[layer]["moment"], rtol=1e-12, atol=1e-12)
        assert torch.equal(resumed[layer]["heldout_keys"], expected[layer]["heldout_keys"])
        assert state.null_spaces[layer].token_count == expected[layer]["count"]
