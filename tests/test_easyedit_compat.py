"""The host-compatibility module (alphaedit_plugin.hosts.easyedit.compat): detection, gating, the CUDA-prefix fix."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from conftest import require_host
import torch

require_host()

import alphaedit_plugin.hosts.easyedit as ee  # noqa: E402
from alphaedit_plugin.hosts.easyedit import compat  # noqa: E402

PYPI = compat.HostInfo(version="0.0.1.dev0", hardcodes_cuda=True, lists_alphaedit_as_batchable=False,
                       has_sequential_edit=False, has_own_alphaedit=False)
CURRENT = compat.HostInfo(version="source", hardcodes_cuda=False, lists_alphaedit_as_batchable=True,
                          has_sequential_edit=True, has_own_alphaedit=True)


@pytest.mark.parametrize("given, expected", [
    ("cuda:cpu", "cpu"), ("cuda:cuda:1", "cuda:1"), ("cuda:mps", "mps"),
    ("cuda:0", "cuda:0"), ("cuda", "cuda"), ("cpu", "cpu"), (0, 0), (torch.device("cpu"), torch.device("cpu")),
])
def test_translate_device(given, expected):
    assert compat.translate_device(given) == expected


@pytest.mark.parametrize("host, device, needed", [
    (PYPI, "cpu", True), (PYPI, "cuda:1", True), (PYPI, 0, False), (PYPI, "0", False),
    (CURRENT, "cpu", False), (CURRENT, 0, False),
])
def test_cuda_fix_is_gated_on_host_and_device(host, device, needed):
    assert compat.needs_cuda_aliases(host, device) is needed


def test_weights_contract_follows_the_host():
    assert PYPI.restores_only_kept_weights and not CURRENT.restores_only_kept_weights


def test_cuda_prefix_aliases_only_inside_the_block():
    tensor, module = torch.zeros(2), torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError):
        tensor.to("cuda:cpu")
    assert "to" not in torch.Tensor.__dict__
    with compat.cuda_prefix_aliases():
        assert compat.cuda_aliases_active()
        assert tensor.to("cuda:cpu").device.type == "cpu"
        assert tensor.to(device="cuda:cpu", dtype=torch.float64).dtype == torch.float64
        assert module.to("cuda:cpu") is module
        with compat.cuda_prefix_aliases():  # re-entrant
            assert tensor.to("cuda:cpu").device.type == "cpu"
        assert compat.cuda_aliases_active()
        with pytest.raises(RuntimeError):
            tensor.to("cuda:nonsense")  # still an invalid device, still an error
    assert not compat.cuda_aliases_active()
    assert "to" not in torch.Tensor.__dict__ and "to" in torch.nn.Module.__dict__
    assert torch.nn.Module.to.__name__ == "to" and not getattr(torch.nn.Module.to, "__alphaedit_plugin_patch__", 0)
    with pytest.raises(RuntimeError):
        tensor.to("cuda:cpu")


def test_cuda_prefix_aliases_restored_after_an_error():
    with pytest.raises(KeyError):
        with compat.cuda_prefix_aliases():
            raise KeyError("x")
    assert not compat.cuda_aliases_active()


def test_detected_host_matches_its_code():
    host = compat.inspect_host()
    from easyeditor.editors.editor import BaseEditor
    import inspect
    source = inspect.getsource(inspect.unwrap(BaseEditor.__init__))
    assert host.hardcodes_cuda == ("cuda:{" in source or "cuda:{" in inspect.getsource(inspect.unwrap(BaseEditor.edit)))
    assert host.has_sequential_edit == ("sequential_edit" in inspect.signature(inspect.unwrap(BaseEditor.edit)).parameters)
    if host.version == "0.0.1.dev0":
        assert host == PYPI


def test_batchable_patch_only_where_needed():
    from easyeditor.editors.batch_editor import BatchEditor

    from alphaedit_plugin import registry

    ee.unregister()
    host_answer = BatchEditor.is_batchable_method
    names = [entry.name for entry in registry.registered_methods()]
    listed = {name: bool(host_answer(name)) for name in names}
    ee.register()
    assert all(BatchEditor.is_batchable_method(name) for name in names)
    assert not BatchEditor.is_batchable_method("ROME")  # the host's answer for its own methods
    patched = getattr(BatchEditor.is_batchable_method, "__alphaedit_plugin_patch__", False)
    assert patched == (not all(listed.values()))
    assert compat.allow_batch_editing(names) is patched  # idempotent
    ee.unregister()
    assert BatchEditor.is_batchable_method is host_answer
    assert {name: bool(BatchEditor.is_batchable_method(name)) for name in names} == listed
    ee.register()


def test_cuda_fix_active_during_host_calls_only_for_our_hparams(tmp_path, monkeypatch):
    """The wrapped BaseEditor methods turn the fix on for AlphaEdit hparams on a CUDA-hard-coding host."""
    from alphaedit_plugin.hosts.easyedit import registration
    seen = []

    def method(self, *args, **kwargs):
        seen.append(compat.cuda_aliases_active())

    class Editor:
        pass

    editor = Editor()
    wrapped = registration._wrap_method(method, PYPI)
    editor.hparams = object()
    wrapped(editor)
    from alphaedit_plugin import AlphaEditHyperParams
    editor.hparams = AlphaEditHyperParams(layers=[1], device="cpu")
    wrapped(editor)
    editor.hparams.device = 0
    wrapped(editor)
    registration._wrap_method(method, CURRENT)(editor)
    assert seen == [False, True, False, False]
    assert not compat.cuda_aliases_active()
