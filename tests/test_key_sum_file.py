"""Kp Kpᵀ in a state file in its smallest exact form: the keys while they are fewer than d_in/2 per layer, the
upper triangle after; read back bit for bit, and a file of format 2 (the sum whole) still loads and resumes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import BUILDERS, FACTS, assert_matches_recording, make_tokenizer
from test_state import legacy_setting

from alphaedit_plugin import EditingState, apply_to_model, create_state, state_identity
from alphaedit_plugin.architectures import templates_for
from alphaedit_plugin.key_sum_file import pack_key_sum, sum_of_key_products, tensor_digest, unpack_key_sum
from alphaedit_plugin.state import EditRecord

LEGACY = Path(__file__).parent / "fixtures" / "legacy_states"


def key_batches(d, sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=generator) for n in sizes]


def record(n):
    return EditRecord(requests=[{"prompt": f"p{i}"} for i in range(n)], update_norms={}, preservation={},
                      target_probability=[], seconds=0.0)


def test_few_keys_are_written_as_keys_and_summed_again_bit_for_bit():
    batches = key_batches(64, [3, 5, 7])
    total = sum_of_key_products(batches, torch.zeros(64, 64))
    entry = pack_key_sum(total, batches)
    assert entry["form"] == "keys" and [k.shape[0] for k in entry["batches"]] == [3, 5, 7]
    again, kept, exact = unpack_key_sum(entry, "layer 1")
    assert exact and torch.equal(again, total) and all(torch.equal(a, b) for a, b in zip(kept, batches))


def test_many_keys_or_none_kept_give_the_upper_triangle_and_an_asymmetric_sum_is_written_whole():
    d = 32
    many = key_batches(d, [10, 6])  # 16 keys: not fewer than d/2
    total = sum_of_key_products(many, torch.zeros(d, d))
    for batches in (many, None):
        entry = pack_key_sum(total, batches)
        assert entry["form"] == "upper" and entry["values"].numel() == d * (d + 1) // 2
        again, kept, exact = unpack_key_sum(entry, "layer 1")
        assert exact and kept is None and torch.equal(again, total)
    skewed = total.clone()
    skewed[0, 1] += 1.0
    assert torch.equal(pack_key_sum(skewed, None), skewed)
    assert torch.equal(unpack_key_sum(skewed, "layer 1")[0], skewed)  # a whole tensor (format 2) reads as it is


def test_keys_that_do_not_give_the_saved_sum_are_not_written_as_keys():
    batches = key_batches(64, [4])
    total = sum_of_key_products(batches, torch.zeros(64, 64))
    total[3, 3] += 1e-3  # not the sum of these keys (symmetric still)
    assert pack_key_sum(total, batches)["form"] == "upper"


def test_a_sum_made_again_with_other_bits_is_told_apart_and_bad_entries_are_refused():
    batches = key_batches(16, [2])
    total = sum_of_key_products(batches, torch.zeros(16, 16))
    entry = pack_key_sum(total, batches)
    _, _, exact = unpack_key_sum({**entry, "sha256": tensor_digest(total + 1)}, "layer 1")
    assert exact is False
    with pytest.raises(ValueError, match=r"layer 3: the saved keys of a 16×16 key sum are not all \(n, 16\)"):
        unpack_key_sum({**entry, "batches": [torch.randn(2, 15)]}, "layer 3")
    with pytest.raises(ValueError, match=r"layer 3: the upper triangle of a 16×16 key sum has 136 values"):
        unpack_key_sum({"form": "upper", "size": 16, "values": torch.zeros(10)}, "layer 3")
    with pytest.raises(ValueError, match="layer 3: not a key sum .*'lower'"):
        unpack_key_sum({"form": "lower"}, "layer 3")


def make_state(tmp_path):
    hparams = legacy_setting(tmp_path, "AlphaEdit")
    model = BUILDERS["llama"]()
    return model, hparams, create_state(model, make_tokenizer(), hparams)


def test_a_state_keeping_its_keys_writes_them_until_they_are_the_larger_form(tmp_path):
    model, hparams, state = make_state(tmp_path)
    state.keep_earlier_keys()
    d = state.earlier_keys_kkt_sum[hparams.layers[0]].shape[0]  # 96 on the tiny Llama
    for t, n in enumerate((20, 20)):
        state.commit({layer: key_batches(d, [n], seed=10 * t + layer)[0] for layer in hparams.layers}, record(n))
    state.save(tmp_path / "state.pt", accumulated_only=True)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert saved["format"] == 3
    assert {e["form"] for e in saved["earlier_keys_kkt_sum"].values()} == {"keys"}

    fresh = create_state(model, make_tokenizer(), hparams).resume(tmp_path / "state.pt")
    for layer in hparams.layers:
        assert torch.equal(fresh.earlier_keys_kkt_sum[layer], state.earlier_keys_kkt_sum[layer])
    # The resumed state goes on keeping them, so its next file is as small; undo takes the last batch out.
    fresh.commit({layer: key_batches(d, [4], seed=99)[0] for layer in hparams.layers}, record(4))
    fresh.save(tmp_path / "again.pt", accumulated_only=True)
    entries = torch.load(tmp_path / "again.pt", weights_only=True)["earlier_keys_kkt_sum"]
    assert [k.shape[0] for k in entries[str(hparams.layers[0])]["batches"]] == [20, 20, 4]
    assert fresh.undo_last()
    fresh.save(tmp_path / "undone.pt", accumulated_only=True)
    entries = torch.load(tmp_path / "undone.pt", weights_only=True)["earlier_keys_kkt_sum"]
    assert [k.shape[0] for k in entries[str(hparams.layers[0])]["batches"]] == [20, 20]

    # 48 keys of 96 inputs: the triangle is now the smaller; the keys are let go, the file stays exact.
    state.commit({layer: key_batches(d, [8], seed=50 + layer)[0] for layer in hparams.layers}, record(8))
    state.save(tmp_path / "full.pt")
    entries = torch.load(tmp_path / "full.pt", weights_only=True)["earlier_keys_kkt_sum"]
    assert {e["form"] for e in entries.values()} == {"upper"}
    loaded = EditingState.load(tmp_path / "full.pt")
    assert all(torch.equal(loaded.earlier_keys_kkt_sum[l], state.earlier_keys_kkt_sum[l]) for l in hparams.layers)
    state.reset()  # a reset state keeps no keys of its own again (it let them go), nor any sum
    assert all(float(v.abs().max()) == 0 for v in state.earlier_keys_kkt_sum.values())


def test_a_state_not_asked_to_keep_keys_writes_the_triangle(tmp_path):
    model, hparams, state = make_state(tmp_path)
    apply_to_model(model, make_tokenizer(), FACTS[:1], hparams, state=state)
    state.save(tmp_path / "state.pt", accumulated_only=True)
    entries = torch.load(tmp_path / "state.pt", weights_only=True)["earlier_keys_kkt_sum"]
    assert {e["form"] for e in entries.values()} == {"upper"}


def test_a_resumed_sum_with_other_rounding_is_said_and_kept(tmp_path, caplog):
    model, hparams, state = make_state(tmp_path)
    state.keep_earlier_keys()
    d = state.earlier_keys_kkt_sum[hparams.layers[0]].shape[0]
    state.commit({layer: key_batches(d, [5], seed=layer)[0] for layer in hparams.layers}, record(5))
    state.save(tmp_path / "state.pt", accumulated_only=True)
    data = torch.load(tmp_path / "state.pt", weights_only=True)
    data["earlier_keys_kkt_sum"][str(hparams.layers[0])]["sha256"] = "0" * 64  # as if summed with other rounding
    torch.save(data, tmp_path / "other.pt")
    with caplog.at_level(logging.WARNING, logger="alphaedit_plugin.state"):
        fresh = create_state(model, make_tokenizer(), hparams).resume(tmp_path / "other.pt")
    assert "differs in its last bits" in caplog.text and fresh.edits_applied == 5


def test_a_format_2_file_loads_and_resumes_with_the_sum_whole(tmp_path):
    """Written by the code before format 3 (tests/fixtures/legacy_states/README.md): one AlphaEdit edit."""
    tok = make_tokenizer()
    hparams = legacy_setting(tmp_path, "AlphaEdit")
    model = BUILDERS["llama"]()
    redone = create_state(model, tok, hparams)
    identity = state_identity(model, hparams, templates_for(model, hparams))
    apply_to_model(BUILDERS["llama"](), tok, FACTS[:1], hparams, state=redone)
    loaded = EditingState.load(LEGACY / "alphaedit_state_format2.pt", expected_identity=identity)
    resumed = create_state(model, tok, hparams).resume(LEGACY / "alphaedit_state_format2.accumulated.pt")
    for state in (loaded, resumed):
        assert state.edits_applied == 1
        for layer in hparams.layers:
            assert_matches_recording(state.earlier_keys_kkt_sum[layer], redone.earlier_keys_kkt_sum[layer],
                                     relative=1e-5)
            assert float(state.earlier_keys_kkt_sum[layer].abs().max()) > 0
