"""The model's dtype, the device and where a model comes from: named as users name them, refused before loading.

A tiny random Llama saved with ``save_pretrained`` stands for a local checkpoint; the same files laid out as
the Hugging Face cache stand for a hub id that was downloaded earlier.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from alphaedit_plugin import AlphaEditHyperParams, apply_to_model, create_state
from alphaedit_plugin.architectures import weight_as_out_in
from alphaedit_plugin.bench.cli import build_parser, config_from_args, main as bench_main
from alphaedit_plugin.demo import main as demo_main
from alphaedit_plugin.hosts.easyedit.registration import load_model_and_tokenizer
from alphaedit_plugin.models import ModelNotAvailableError, check_model_source, load_model
from alphaedit_plugin.run_settings import SettingError, canonical_dtype, check_device, model_dtype_name

from conftest import FACTS, ROOT, build_llama, exact_hparams, make_hparams, make_tokenizer

SHIPPED = ROOT / "alphaedit_plugin" / "shipped_hparams"

NO_CUDA = not torch.cuda.is_available()


# ---- dtype names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling, name", [("float32", "float32"), ("fp32", "float32"), ("bf16", "bfloat16"),
                                            ("BFloat16", "bfloat16"), ("torch.bfloat16", "bfloat16"),
                                            ("fp16", "float16"), ("half", "float16"), (torch.float16, "float16")])
def test_dtype_spellings_map_to_torch_names(spelling, name):
    assert canonical_dtype(spelling) == name


def test_a_dtype_torch_does_not_have_is_refused_by_name():
    with pytest.raises(SettingError, match="dtype 'bfloat15' is not a torch dtype; expected one of float32, bfloat16"):
        canonical_dtype("bfloat15")
    with pytest.raises(SettingError, match="'int8' is a torch dtype but not one a model is edited in"):
        canonical_dtype("int8")


def test_hparams_dtype_and_easyedits_fp16_agree_or_are_refused(tmp_path):
    assert make_hparams(tmp_path, "llama").model_dtype == "float32"
    assert make_hparams(tmp_path, "llama", fp16=True).model_dtype == "float16"
    assert make_hparams(tmp_path, "llama", dtype="bf16").model_dtype == "bfloat16"
    assert make_hparams(tmp_path, "llama", fp16=True, dtype="float16").model_dtype == "float16"
    with pytest.raises(ValueError, match="fp16: true .* contradicts dtype: bfloat16"):
        make_hparams(tmp_path, "llama", fp16=True, dtype="bfloat16")
    with pytest.raises(ValueError, match="dtype 'float8' is not a torch dtype"):
        make_hparams(tmp_path, "llama", dtype="float8")
    assert model_dtype_name(None, False) == "float32"


def test_dtype_is_a_run_time_field_not_a_method_field(tmp_path):
    fields = make_hparams(tmp_path, "llama", dtype="bfloat16").method_fields()
    assert "dtype" not in fields and "trust_remote_code" not in fields


# ---- devices -----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_where_there_is_none_is_a_clear_error():
    with pytest.raises(SettingError, match=r"--device 'cuda': torch .* (built without CUDA|sees no CUDA device); use cpu"):
        check_device("cuda", "--device")
    with pytest.raises(SettingError, match="device 0 = .cuda:0.: torch"):
        check_device(0)


def test_a_device_torch_does_not_know_is_refused():
    with pytest.raises(SettingError, match="device 'gpu' is not a device torch knows"):
        check_device("gpu")
    assert check_device("cpu") == torch.device("cpu")


# ---- where a model comes from ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama and its tokenizer, saved as a user's local checkpoint."""
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny-llama"
    build_llama(seed=3).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def hub_cache_with(checkpoint, tmp_path, repo_id: str = "tiny-org/tiny-llama"):
    """The checkpoint's files in the Hugging Face cache layout, as an earlier download leaves them."""
    owner, name = repo_id.split("/")
    repo = tmp_path / "hub" / f"models--{owner}--{name}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return tmp_path / "hub"


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_local_checkpoint_loads_in_the_dtype_asked_for(checkpoint, dtype):
    model, tok = load_model(str(checkpoint), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert not model.training and tok("Paris is")["input_ids"]


def test_a_hub_id_loads_from_the_local_cache_offline(checkpoint, tmp_path, offline):
    cache = hub_cache_with(checkpoint, tmp_path)
    assert check_model_source("tiny-org/tiny-llama", cache_dir=str(cache)) == "hub"
    model, _ = load_model("tiny-org/tiny-llama", dtype="bf16", cache_dir=str(cache))
    assert model.config.model_type == "llama" and next(model.parameters()).dtype == torch.bfloat16
    expected = build_llama(seed=3).state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16)
    assert torch.equal(model.state_dict()["model.layers.1.mlp.down_proj.weight"], expected)


def test_a_hub_id_that_is_not_cached_offline_says_how_to_get_it(checkpoint, tmp_path, offline):
    cache = hub_cache_with(checkpoint, tmp_path)
    with pytest.raises(ModelNotAvailableError, match=r"--model 'tiny-org/tiny-lama' is not in the local Hugging Face "
                                                     r"cache .* `hf download tiny-org/tiny-lama`"):
        load_model("tiny-org/tiny-lama", cache_dir=str(cache), field="--model")


def test_bad_model_names_are_refused_before_anything_loads(checkpoint, tmp_path, monkeypatch):
    import transformers

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="model_name '.*empty': the folder has no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotAvailableError, match="model_name './no-such-model': no such folder"):
        load_model("./no-such-model")
    with pytest.raises(ModelNotAvailableError, match="'meta llama/Llama-3' is neither a local folder nor a valid hub id"):
        load_model("meta llama/Llama-3")
    with pytest.raises(SettingError, match="dtype 'bfloat15' is not a torch dtype"):
        load_model(str(checkpoint), dtype="bfloat15")


def test_trust_remote_code_reaches_transformers(checkpoint, monkeypatch):
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    load_model(str(checkpoint), trust_remote_code=True)
    assert seen["trust_remote_code"] is True


def test_base_editors_loader_honours_dtype_and_fp16(checkpoint, tmp_path):
    model, tok = load_model_and_tokenizer(str(checkpoint), make_hparams(tmp_path, "llama", dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).device.type == "cpu"
    model, _ = load_model_and_tokenizer(str(checkpoint), make_hparams(tmp_path, "llama", fp16=True))
    assert next(model.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="hparams.model_name './missing': no such folder"):
        load_model_and_tokenizer("./missing", make_hparams(tmp_path, "llama"))


# ---- the edit in a narrow dtype: the model keeps its dtype, the statistics stay wide -----------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_statistics_projector_and_solve_stay_wide_in_a_narrow_model(tmp_path, dtype, caplog):
    model, tok = build_llama().to(dtype), make_tokenizer()
    hparams = exact_hparams(tmp_path, "llama", dtype=canonical_dtype(dtype))
    with caplog.at_level(logging.WARNING):
        state = create_state(model, tok, hparams)
    assert "the model given is" not in caplog.text  # asked for and given the same dtype
    for space in state.null_spaces.values():
        assert space.projector.dtype in (torch.float32, torch.float64)
    before = weight_as_out_in(model.get_submodule("model.layers.1.mlp.down_proj")).detach().clone()
    apply_to_model(model, tok, FACTS[:1], hparams, state=state)
    after = weight_as_out_in(model.get_submodule("model.layers.1.mlp.down_proj"))
    assert after.dtype == dtype and torch.isfinite(after).all() and not torch.equal(before, after)
    assert all(total.dtype == torch.float32 for total in state.earlier_keys_kkt_sum.values())


def test_a_model_in_another_dtype_than_the_hparams_say_is_edited_in_its_own_with_a_warning(tmp_path, caplog):
    model, tok = build_llama(), make_tokenizer()
    with caplog.at_level(logging.WARNING):
        create_state(model, tok, exact_hparams(tmp_path, "llama", dtype="bfloat16"))
    assert "ask for a bfloat16 model" in caplog.text and "edited in float32" in caplog.text


# ---- the command lines -------------------------------------------------------------------------------------

DATA = "counterfact.json"


def bench_args(*extra):
    return build_parser().parse_args(["--data", DATA, "--edits", "2", "--output", "o", *extra])


def test_bench_dtype_sets_every_methods_dtype_and_the_models(tmp_path):
    config = config_from_args(bench_args("--methods", "AlphaEdit", "MEMIT", "unedited", "--dtype", "bf16"))
    assert config.model_dtype == "bfloat16"
    assert config.method_options["MEMIT"].overrides["dtype"] == "bf16"
    assert config.method_options["MEMIT"].overrides["fp16"] is False
    assert config_from_args(bench_args("--methods", "AlphaEdit")).model_dtype == "float32"


def test_bench_takes_the_dtype_the_methods_hparams_agree_on(tmp_path):
    def yaml_with(shipped: str, extra: str) -> str:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text((SHIPPED / shipped).read_text() + extra)
        return str(path)

    half = yaml_with("MEMIT/smollm2-135m.yaml", "\nfp16: true\n")
    bf16 = yaml_with("MEMIT/smollm2-135m-projected.yaml", "\ndtype: bfloat16\n")
    config = config_from_args(bench_args("--methods", "MEMIT", "--method-hparams", f"MEMIT={half}"))
    assert config.model_dtype == "float16"
    with pytest.raises(ValueError, match=r"different model dtypes \(MEMIT: float16, MEMIT\+P: bfloat16\).*--dtype"):
        config_from_args(bench_args("--methods", "MEMIT", "MEMIT+P", "--method-hparams", f"MEMIT={half}",
                                    f"MEMIT+P={bf16}"))
    # --dtype settles it for every method
    config = config_from_args(bench_args("--methods", "MEMIT", "MEMIT+P", "--dtype", "float32",
                                         "--method-hparams", f"MEMIT={half}", f"MEMIT+P={bf16}"))
    assert config.model_dtype == "float32"


def test_bench_refuses_bad_settings_before_loading(tmp_path, caplog, monkeypatch):
    import alphaedit_plugin.models as models

    monkeypatch.setattr(models, "load_smollm2", lambda *a, **k: pytest.fail("the model was loaded"))
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([]))
    common = ["--data", str(data), "--edits", "1", "--output", str(tmp_path / "out"), "--methods", "unedited"]
    with caplog.at_level(logging.ERROR):
        assert bench_main(common + ["--dtype", "bfloat15"]) == 2
    assert "--dtype 'bfloat15' is not a torch dtype" in caplog.text
    if NO_CUDA:
        assert bench_main(common + ["--device", "cuda"]) == 2
        assert "--device 'cuda'" in caplog.text and "use cpu" in caplog.text


def test_demo_refuses_bad_settings_before_loading(caplog, monkeypatch):
    import alphaedit_plugin.demo as demo

    monkeypatch.setattr(demo, "load_smollm2", lambda *a, **k: pytest.fail("the model was loaded"))
    with caplog.at_level(logging.ERROR):
        assert demo_main(["--dtype", "bfloat15"]) == 2
    assert "dtype 'bfloat15' is not a torch dtype" in caplog.text
    if NO_CUDA:
        assert demo_main(["--device", "cuda"]) == 2
        assert "--device 'cuda'" in caplog.text


def test_an_unknown_field_is_still_refused_with_the_allowed_ones_listed(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("alg_name: AlphaEdit\nlayers: [1]\ntorch_dtype: bfloat16\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['torch_dtype'\].*'dtype'"):
        AlphaEditHyperParams.from_hparams(path)
