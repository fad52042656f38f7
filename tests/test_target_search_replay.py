"""The target search runs the blocks below δ once per batch and replays their output: the same search."""

import math

import pytest
import torch

from conftest import BUILDERS, FACTS
from alphaedit_plugin import AlphaEditHyperParams, normalise_requests
from alphaedit_plugin.architectures import get_module, templates_for
from alphaedit_plugin.compute_targets import compute_target_values

REQUESTS = [
    {"prompt": "The capital of France", "subject": "France", "target_new": "Rome"},
    {"prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Italy"},  # subject at position 0
    {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "Berlin Madrid"},  # two tokens
]
CONTEXTS = [["{}"], ["The city of. {}", "Because I. {}"]]


def search(model, tokenizer, replay: bool, prefix: bool, steps: int = 12, layer: int = 2, requests=REQUESTS,
           **fields):
    fields = {"v_lr": 0.5, "clamp_norm_factor": 10, "v_weight_decay": 1e-3, **fields}
    hparams = AlphaEditHyperParams(layers=[0, layer], v_num_grad_steps=steps, **fields)
    return compute_target_values(model, tokenizer, normalise_requests(requests), hparams,
                                 templates_for(model, hparams), layer, CONTEXTS, use_prefix_cache=prefix,
                                 replay_lower_blocks=replay, padding_tolerance=math.inf)  # one chunk: one batch


@pytest.mark.parametrize("prefix", [True, False], ids=["prefix-cache", "full-rows"])
def test_replaying_the_lower_blocks_gives_the_same_search(arch, tokenizer, prefix):
    model = BUILDERS[arch]()
    replayed, computed = search(model, tokenizer, True, prefix), search(model, tokenizer, False, prefix)
    assert replayed.steps == computed.steps
    assert torch.allclose(replayed.initial, computed.initial, rtol=1e-6, atol=1e-6)
    assert torch.allclose(replayed.values, computed.values, rtol=1e-5, atol=1e-5)
    assert replayed.final_loss == pytest.approx(computed.final_loss, rel=1e-5, abs=1e-6)
    assert not torch.allclose(computed.values, computed.initial)  # the search moved: the comparison means something


@pytest.mark.parametrize("prefix", [True, False], ids=["prefix-cache", "full-rows"])
def test_facts_that_converge_early_leave_the_replayed_batch_too(tokenizer, monkeypatch, prefix):
    """A fact that converges leaves the batch; the replayed states of the others are kept row for row."""
    import alphaedit_plugin.compute_targets as targets

    rebuilt = []
    build = targets._build_batch

    def counting(*args, previous=None, **kwargs):
        batch = build(*args, previous=previous, **kwargs)
        if previous is not None:
            rebuilt.append(previous.below is not None and batch.below is not None)
        return batch

    monkeypatch.setattr(targets, "_build_batch", counting)
    monkeypatch.setattr(targets, "STOP_LOSS", 0.4)  # the facts cross it at different steps
    model = BUILDERS["llama"]()
    fast = dict(steps=60, requests=FACTS)  # subjects last: they converge within the steps, at different steps
    computed = search(model, tokenizer, False, prefix, **fast)
    replayed = search(model, tokenizer, True, prefix, **fast)
    assert True in rebuilt  # facts left a replayed batch
    assert torch.allclose(replayed.values, computed.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [1, 2])
def test_the_blocks_below_delta_run_in_the_first_pass_only(arch, tokenizer, layer):
    """Counted at each block's MLP, which runs only where the block's own forward does."""
    model = BUILDERS[arch]()
    templates = templates_for(model, AlphaEditHyperParams(layers=[0, layer]))
    runs = {i: 0 for i in range(4)}
    for index in runs:
        get_module(model, templates.mlp_module_tmp.format(index)).register_forward_pre_hook(
            lambda module, args, index=index: runs.__setitem__(index, runs[index] + 1))
    result = search(model, tokenizer, True, False, steps=6, layer=layer)
    assert result.steps == 6
    assert [runs[i] for i in range(layer + 1)] == [1] * (layer + 1), runs  # the first pass only (full rows)
    assert [runs[i] for i in range(layer + 1, 4)] == [6] * (3 - layer), runs  # up to the readout: every step
    assert "forward" not in get_module(model, templates.layer_module_tmp.format(0)).__dict__  # put back
