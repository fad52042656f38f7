"""``AlphaEdit@host``: the current EasyEdit's own AlphaEdit run by the benchmark beside the plugin's.

The host runs against ../shared/hosts/EasyEdit and skips, saying why, without it; the label and
missing-host checks always run.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import BUILDERS, FACTS, exact_hparams, make_hparams, needs_host, run_without_host, weights_snapshot

from alphaedit_plugin.architectures import get_module, templates_for, weight_as_out_in
from alphaedit_plugin.bench.methods import (HOST_ALPHAEDIT, MethodOptions, available_methods, create_method,
                                            default_hparams_path, load_method_hparams)
from alphaedit_plugin.hosts.easyedit.host_alphaedit import dispatch_model_name
from alphaedit_plugin.layer_statistics import load_second_moments


def test_the_bench_lists_the_host_and_gives_it_alphaedits_yaml(tmp_path):
    assert HOST_ALPHAEDIT in available_methods()
    assert default_hparams_path(HOST_ALPHAEDIT, "smollm2") == default_hparams_path("AlphaEdit", "smollm2")
    memit_yaml = default_hparams_path("MEMIT", "smollm2")
    with pytest.raises(ValueError, match=r"--method-hparams AlphaEdit@host=PATH"):
        load_method_hparams(HOST_ALPHAEDIT, str(memit_yaml))


@pytest.mark.parametrize("arch, expected", [("gpt2", "gpt2-xl"), ("llama", "llama")])
def test_the_host_is_told_the_down_projections_kind_through_its_name_dispatch(tmp_path, arch, expected):
    model = BUILDERS[arch]()
    template = templates_for(model, make_hparams(tmp_path, arch)).rewrite_module_tmp
    assert dispatch_model_name(model, template, 1) == expected


def test_without_the_host_the_error_says_where_to_put_it(tmp_path):
    result = run_without_host(
        "import pytest\n"
        "from pathlib import Path\n"
        "from conftest import BUILDERS, make_tokenizer, make_hparams\n"
        "from alphaedit_plugin.bench.methods import MethodOptions, create_method\n"
        "from alphaedit_plugin.hosts.easyedit.memit_steps import HostUnavailableError\n"
        f"hparams = make_hparams(Path({str(tmp_path)!r}), 'llama')\n"
        "with pytest.raises(HostUnavailableError, match='AlphaEdit@host needs the current EasyEdit source'):\n"
        "    create_method('AlphaEdit@host', BUILDERS['llama'](), make_tokenizer(), MethodOptions(hparams=hparams))\n"
        "print('refused')\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused" in result.stdout


# ---------------------------------------------------------------------------
# On the real host
# ---------------------------------------------------------------------------
def exact_host_hparams(tmp_path, arch, **overrides):
    """A rank-deficient moment (46 corpus tokens, fewer than the MLP width): an exact null space. The threshold
    is 1e-4, not 1e-6: the host takes an SVD of the moment in float32, whose zero eigenvalues come out near
    1e-6 of the largest."""
    return exact_hparams(tmp_path, arch, nullspace_threshold=1e-4, **overrides)


def host_run(model, tok, hparams):
    run = create_method(HOST_ALPHAEDIT, model, tok, MethodOptions(hparams=hparams))
    run.prepare()
    return run


def edited_weights(model, run):
    return {layer: weight_as_out_in(get_module(model, run.templates.rewrite_module_tmp.format(layer))).detach().clone()
            for layer in run.hparams.layers}


@needs_host
def test_the_hosts_statistics_are_the_plugins_texts(tmp_path, arch, tokenizer):
    """Fed through the host's own layer_stats, the texts give the second moment the plugin computes (in eval
    mode, as from_pretrained leaves a model: the host's layer_stats runs the model in the mode it finds it)."""
    model = BUILDERS[arch]().eval()
    hparams = exact_host_hparams(tmp_path, arch, mom2_heldout_fraction=0.25)  # the held-out share is left out in both
    run = host_run(model, tokenizer, hparams)
    ours = load_second_moments(model, tokenizer, hparams, run.templates)
    cached = {layer_name: moment for (_, layer_name), moment in run.host.main.COV_CACHE.items()}
    for layer in hparams.layers:
        host = cached[run.templates.rewrite_module_tmp.format(layer)].double()
        assert torch.allclose(host, ours[layer], rtol=1e-5, atol=1e-6 * ours[layer].abs().max().item()), layer
    assert tuple(run.host.main.P.shape) == (len(hparams.layers), *ours[hparams.layers[0]].shape)


@needs_host
def test_the_hosts_edit_stays_in_its_null_space_and_leaves_the_caller_as_it_was(tmp_path, arch, tokenizer):
    model = BUILDERS[arch]()
    hparams = exact_host_hparams(tmp_path, arch)
    run = host_run(model, tokenizer, hparams)
    tokens = 46  # the 4-line corpus's tokens: the moment's rank
    for index in range(len(hparams.layers)):
        projector = run.host.main.P[index].double()
        assert round(float(torch.trace(projector))) == projector.shape[0] - tokens
    before, snapshot = edited_weights(model, run), weights_snapshot(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    cwd = os.getcwd()
    run.edit(FACTS)
    assert os.getcwd() == cwd and not os.path.exists("null_space_project.pt")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    edited = set(run.edited_parameters())
    for name, tensor in model.state_dict().items():
        if name not in edited:
            assert torch.equal(tensor, snapshot[name]), name
    after = edited_weights(model, run)
    for index, layer in enumerate(hparams.layers):
        change = (after[layer] - before[layer]).double()
        projector = run.host.main.P[index].double()
        assert change.norm() > 0, layer
        outside = change - change @ projector  # what the update does outside the null space: nothing
        assert outside.norm() <= 1e-4 * change.norm(), (layer, float(outside.norm() / change.norm()))


@needs_host
def test_a_resumed_host_run_edits_as_one_that_never_stopped(tmp_path, tokenizer):
    model = BUILDERS["llama"]()
    hparams = exact_host_hparams(tmp_path, "llama")
    run = host_run(model, tokenizer, hparams)
    run.edit(FACTS[:2])
    after_first = {name: t.detach().clone() for name, t in model.state_dict().items()}
    run.save_state(tmp_path)
    run.edit(FACTS[2:])
    continuous = edited_weights(model, run)

    model.load_state_dict(after_first)
    resumed = create_method(HOST_ALPHAEDIT, model, tokenizer, MethodOptions(hparams=hparams))
    resumed.load_state(tmp_path)
    resumed.edit(FACTS[2:])
    for layer, weight in edited_weights(model, resumed).items():
        assert torch.allclose(weight, continuous[layer], rtol=1e-5, atol=1e-7), layer


# ---------------------------------------------------------------------------
# SPHERE@host: the host's SPHERE, the same adapter
# ---------------------------------------------------------------------------
def test_the_bench_lists_the_hosts_sphere_and_gives_it_spheres_yaml():
    from alphaedit_plugin.bench.methods import HOST_SPHERE

    assert HOST_SPHERE in available_methods()
    assert default_hparams_path(HOST_SPHERE, "smollm2") == default_hparams_path("SPHERE", "smollm2")
    with pytest.raises(ValueError, match=r"--method-hparams SPHERE@host=PATH"):
        load_method_hparams(HOST_SPHERE, str(default_hparams_path("AlphaEdit", "smollm2")))


@needs_host
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_hosts_sphere_writes_its_soft_projection_of_the_hosts_alphaedit_update(tmp_path, arch, tokenizer):
    """From the same weights, P, key cache and context prefixes, SPHERE@host writes the host's
    ``sparse_projection`` of the update AlphaEdit@host writes: the two host modules share their solve, and the
    adapter runs each with its own globals and hyperparameters (cumulative_ratio, suppression_strength)."""
    from alphaedit_plugin.bench.methods import HOST_SPHERE
    from test_sphere import sphere_hparams

    model = BUILDERS[arch]()
    start = {name: t.detach().clone() for name, t in model.state_dict().items()}
    hparams = exact_host_hparams(tmp_path, arch)
    alpha = host_run(model, tokenizer, hparams)
    torch.manual_seed(0)
    alpha.edit(FACTS[:2])
    alpha_params = {n: p.detach().clone() for n, p in model.named_parameters() if n in alpha.edited_parameters()}
    alpha.save_state(tmp_path)  # P, the key cache after the edit, and the context prefixes it sampled

    model.load_state_dict(start)
    sphere_fields = dict(cumulative_ratio=0.5, suppression_strength=0.7, nullspace_threshold=1e-4)
    sphere = create_method(HOST_SPHERE, model, tokenizer,
                           MethodOptions(hparams=sphere_hparams(tmp_path, arch, **sphere_fields)))
    state = torch.load(tmp_path / alpha.STATE_FILE, weights_only=True)
    sphere.host.load_state({**state, "cache_c": None})  # the key cache as before AlphaEdit's edit: empty
    assert sphere.host.host_hparams.suppression_strength == 0.7 and sphere.host.main is not alpha.host.main
    torch.manual_seed(0)
    sphere.edit(FACTS[:2])
    for name, before in ((n, start[n]) for n in alpha_params):
        alpha_change = alpha_params[name] - before
        expected = sphere.host.main.sparse_projection(before, alpha_change, eta=0.5, alpha=0.7)[0]
        written = dict(model.named_parameters())[name].detach() - before
        assert alpha_change.norm() > 0 and not torch.allclose(written, alpha_change, rtol=1e-3, atol=1e-6), name
        assert torch.allclose(written, expected.to(written.dtype), rtol=1e-4, atol=1e-6 * expected.abs().max()), name
