"""The current EasyEdit source (not on PyPI): edit(sequential_edit=...), batch_edit, its own AlphaEdit.

Runs when EASYEDIT_SOURCE points at a checkout of https://github.com/zjunlp/EasyEdit (the folder that
holds ``easyeditor/``). It runs in a subprocess so that it never mixes with a PyPI ``easyeditor`` in this
process; EASYEDIT_PYTHON names the interpreter with that source's requirements (transformers 5.x),
default: this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SOURCE = os.environ.get("EASYEDIT_SOURCE")
pytestmark = pytest.mark.skipif(
    not SOURCE, reason="EASYEDIT_SOURCE is not set: point it at a checkout of the current EasyEdit source "
                       "(git clone https://github.com/zjunlp/EasyEdit) to run these tests")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r'''
    import json, os, sys
    import torch
    sys.path[:0] = [os.environ["EASYEDIT_SOURCE"], os.environ["ALPHAEDIT_ROOT"], os.environ["ALPHAEDIT_TESTS"]]
    import easyeditor
    assert os.path.realpath(easyeditor.__file__).startswith(os.path.realpath(os.environ["EASYEDIT_SOURCE"])), easyeditor.__file__
    from easyeditor import BaseEditor
    from easyeditor.util.alg_dict import ALG_DICT
    import alphaedit_plugin
    import alphaedit_plugin.easyedit as ee
    from alphaedit_plugin import AlphaEditHyperParams
    from conftest import build_llama, make_tokenizer, write_corpus
    from pathlib import Path
    import transformers

    tmp = Path(os.environ["WORK"])
    os.chdir(tmp)
    out = {"transformers": transformers.__version__, "host": repr(ee.inspect_host())}
    dispatcher = ALG_DICT["AlphaEdit"]
    from easyeditor.models.alphaedit import apply_AlphaEdit_to_model
    out["host_alphaedit_kept"] = dispatcher.host_apply is apply_AlphaEdit_to_model
    ee.register()
    out["idempotent"] = ALG_DICT["AlphaEdit"] is dispatcher

    def editor_for(batch_size=1):
        hp = AlphaEditHyperParams(layers=[1, 2], v_num_grad_steps=20, v_lr=0.5, clamp_norm_factor=10,
                                  v_weight_decay=1e-3, L2=0.1, nullspace_threshold=0.5,
                                  mom2_dataset=write_corpus(tmp / "corpus.txt"), mom2_n_samples=60,
                                  stats_dir=str(tmp / "stats"), context_template_count=2,
                                  context_template_length=3, batch_size=batch_size, device="cpu")
        hp.model_name = (build_llama(), make_tokenizer())
        return BaseEditor.from_hparams(hp), hp

    def top(editor, prompt):
        ids = torch.tensor([editor.tok(prompt)["input_ids"]])
        with torch.no_grad():
            return editor.tok.convert_ids_to_tokens(int(editor.model(input_ids=ids).logits[0, -1].argmax()))

    editor, hp = editor_for()
    loc = {"neighborhood": {"prompt": ["The capital of Spain"], "ground_truth": ["Madrid"]}}
    m, _, _ = editor.edit(prompts=["The capital of France"], target_new=["Rome"], subject=["France"],
                          rephrase_prompts=["A capital of France"], locality_inputs=loc, sequential_edit=False)
    out["nonseq_post"] = m[0]["post"]["rewrite_acc"]
    out["nonseq_restored"] = top(editor, "The capital of France") != "Rome"
    out["nonseq_state_edits"] = ee.get_state(editor.model, hp).edits_applied
    m, _, _ = editor.edit(prompts=["The capital of France"], target_new=["Rome"], subject=["France"],
                          locality_inputs=loc, sequential_edit=True)
    m2, _, _ = editor.edit(prompts=["The language of Italy"], target_new=["German"], subject=["Italy"],
                           sequential_edit=True)
    out["seq_first_kept"] = top(editor, "The capital of France") == "Rome"
    out["seq_second"] = top(editor, "The language of Italy") == "German"
    out["seq_state_edits"] = ee.get_state(editor.model, hp).edits_applied
    out["locality_keys"] = sorted(m[0]["post"]["locality"])

    editor, hp = editor_for(batch_size=2)
    m, _, _ = editor.batch_edit(prompts=["The capital of France", "The river of Japan"], target_new=["Rome", "Nile"],
                                subject=["France", "Japan"], sequential_edit=True)
    out["batch_post"] = [x["post"]["rewrite_acc"] for x in m]
    out["batch_state_edits"] = ee.get_state(editor.model, hp).edits_applied
    print("RESULT " + json.dumps(out))
''')


def test_current_easyedit_source(tmp_path):
    source = Path(SOURCE)
    if not (source / "easyeditor" / "__init__.py").is_file():
        pytest.fail(f"EASYEDIT_SOURCE={SOURCE} does not hold easyeditor/__init__.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", EASYEDIT_SOURCE=str(source), ALPHAEDIT_ROOT=str(ROOT),
               ALPHAEDIT_TESTS=str(ROOT / "tests"), WORK=str(tmp_path))
    python = os.environ.get("EASYEDIT_PYTHON", sys.executable)
    run = subprocess.run([python, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
    assert run.returncode == 0 and lines, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["host_alphaedit_kept"] and out["idempotent"]
    assert out["nonseq_post"] == [1.0] and out["nonseq_restored"] and out["nonseq_state_edits"] == 0
    assert out["seq_first_kept"] and out["seq_second"]
    assert out["seq_state_edits"] == 2
    assert "neighborhood_acc" in out["locality_keys"]
    assert out["batch_post"] == [[1.0], [1.0]] and out["batch_state_edits"] == 2
