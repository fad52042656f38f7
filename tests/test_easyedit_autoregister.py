"""`import alphaedit_plugin` registers AlphaEdit where EasyEdit is installed, and is harmless where it is not."""

from __future__ import annotations

import importlib.util

import pytest

HAS_HOST = importlib.util.find_spec("easyeditor") is not None


@pytest.mark.skipif(HAS_HOST, reason="easyeditor is installed here; this checks the core environment without it")
def test_without_easyeditor_nothing_happens_and_register_says_why():
    from alphaedit_plugin.easyedit.autoregister import register_if_available
    import alphaedit_plugin.easyedit as ee

    assert register_if_available() is False
    with pytest.raises(ImportError, match="scripts/setup_easyedit_env.sh"):
        ee.register()


@pytest.mark.skipif(not HAS_HOST, reason="the EasyEdit host package `easyeditor` is not installed in this "
                                         "environment; the integration tests run in .venv-easyedit")
def test_with_easyeditor_importing_registers():
    from alphaedit_plugin.easyedit.autoregister import register_if_available
    from easyeditor.util.alg_dict import ALG_DICT

    assert register_if_available() is True
    assert getattr(ALG_DICT["AlphaEdit"], "__alphaedit_plugin_patch__", False)
