"""`import alphaedit_plugin` registers every method where EasyEdit is importable, and is harmless where it is not."""

from __future__ import annotations

from conftest import needs_host, run_without_host


def test_without_easyeditor_nothing_happens_and_register_says_why():
    result = run_without_host(
        "import pytest\n"
        "from alphaedit_plugin.hosts.easyedit.autoregister import register_if_available\n"
        "import alphaedit_plugin.hosts.easyedit as ee\n"
        "assert register_if_available() is False\n"
        "with pytest.raises(ImportError, match='Put a checkout of the EasyEdit source on sys.path'):\n"
        "    ee.register()\n"
        "print('core without the host: OK')\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core without the host: OK" in result.stdout


@needs_host
def test_with_easyeditor_importing_registers_every_method():
    from easyeditor.util.alg_dict import ALG_DICT

    from alphaedit_plugin import registry
    from alphaedit_plugin.hosts.easyedit.autoregister import register_if_available

    assert register_if_available() is True
    for entry in registry.registered_methods():
        assert getattr(ALG_DICT[entry.name], "__alphaedit_plugin_patch__", False), entry.name
