"""Malformed signpost folders and paths: every defect is a SignpostError that names the field and the fix.

A valid folder is written by save_signposts, then damaged one way per case: metadata fields of the wrong type or
range, file lists of the wrong length, absurd but finite tables and thresholds (with matching checksums, so only
the range checks can catch them), a path that is a file, and the Hugging Face Hub form.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from reliability_helpers import gen, setup_model
from safetensors.torch import save_file
from test_signposts import make_signposts

from kvquant_hf.cache import KVQuantCache
from kvquant_hf.errors import SignpostError
from kvquant_hf.signposts import (
    METADATA_FILE,
    layer_filename,
    load_signposts,
    save_signposts,
    sha256_file,
    validate_signposts,
)

FIX = r".*calibrate\.py"
DELETE = object()


def _set(meta: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = meta
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value


def _write_meta(folder: str, meta) -> None:
    Path(folder, METADATA_FILE).write_text(json.dumps(meta))


def _read_meta(folder: str) -> dict:
    return json.loads(Path(folder, METADATA_FILE).read_text())


@pytest.fixture
def folder(tmp_path):
    """A valid 4-bit folder for a 2-layer, 2-kv-head, head_dim-16 llama (the tiny test model)."""
    return save_signposts(make_signposts(make_tiny_llama(), bits=4), tmp_path)


# (field, value, what the message must say): one metadata.json field set to a wrong type or an absurd value
METADATA_CASES = [
    ("bits", "4", r"'bits' is '4' \(a str\), expected 2, 3 or 4"),
    ("bits", 4.0, r"'bits' is 4.0 \(a float\), expected 2, 3 or 4"),
    ("bits", True, r"'bits' is True \(a bool\)"),
    ("bits", 16, r"'bits' is 16 \(a int\), expected 2, 3 or 4"),
    ("format_version", True, r"format_version=True.*reads version 1 only"),
    ("format_version", "1", r"format_version='1'.*reads version 1 only"),
    ("model", ["llama"], r"'model' is \['llama'\] \(a list\)"),
    ("model", "llama", r"'model' is 'llama' \(a str\)"),
    ("model.num_hidden_layers", "2", r"'model.num_hidden_layers' is '2' \(a str\), expected an integer in \[1, 4096\]"),
    ("model.num_hidden_layers", -2, r"'model.num_hidden_layers' is -2 .*expected an integer in \[1, 4096\]"),
    ("model.num_hidden_layers", 0, r"'model.num_hidden_layers' is 0 "),
    ("model.num_hidden_layers", 10**12, r"'model.num_hidden_layers' is 1000000000000 "),
    ("model.num_hidden_layers", 2.0, r"'model.num_hidden_layers' is 2.0 \(a float\)"),
    ("model.num_hidden_layers", None, r"'model.num_hidden_layers' is None"),
    ("model.num_hidden_layers", DELETE, r"lacks model.num_hidden_layers"),
    ("model.num_key_value_heads", [2], r"'model.num_key_value_heads' is \[2\] \(a list\)"),
    ("model.num_key_value_heads", -1, r"'model.num_key_value_heads' is -1 "),
    ("model.head_dim", 16.5, r"'model.head_dim' is 16.5 \(a float\)"),
    ("model.head_dim", 1 << 40, r"'model.head_dim' is 1099511627776 "),
    ("model.head_dim", {"value": 16}, r"'model.head_dim' is \{'value': 16\} \(a dict\)"),
    ("model.head_dim", DELETE, r"lacks model.head_dim"),
    ("model.model_type", 7, r"'model.model_type' is 7 \(a int\), expected a model type name"),
    ("model.model_type", "", r"'model.model_type' is '' \(a str\)"),
    ("model.model_type", DELETE, r"lacks model.model_type"),
    ("model.num_attention_heads", "4", r"'model.num_attention_heads' is '4' \(a str\)"),
    ("model.hidden_size", -64, r"'model.hidden_size' is -64 "),
    ("model.name_or_path", ["a", "b"], r"'model.name_or_path' is \['a', 'b'\] \(a list\), expected a string"),
    ("files", DELETE, r"lacks 'files'"),
    ("files", ["layer_000.safetensors", "layer_001.safetensors"], r"'files' is \[.*\(a list\)"),
    ("files", "abc", r"'files' is 'abc' \(a str\)"),
    ("files.layer_001.safetensors", DELETE, r"lists no checksum for \['layer_001.safetensors'\].*'files' lists 1"),
    ("files.layer_002.safetensors", "0" * 64, r"'files' lists 3 files but model.num_hidden_layers=2"),
    ("files.layer_000.safetensors", 12345, r"'files.layer_000.safetensors' is 12345 \(a int\), expected a SHA-256"),
    ("files.layer_000.safetensors", "abc", r"'files.layer_000.safetensors' is 'abc' .*64 lowercase hex digits"),
    ("files.layer_000.safetensors", None, r"'files.layer_000.safetensors' is None"),
    ("outlier_fraction", "0.01", r"'outlier_fraction' is '0.01' \(a str\), expected a number in \[0, 0.1\]"),
    ("outlier_fraction", 5.0, r"'outlier_fraction' is 5.0 .*expected a number in \[0, 0.1\]"),
    ("outlier_fraction", -0.01, r"'outlier_fraction' is -0.01 "),
    ("outlier_fraction", float("nan"), r"'outlier_fraction' is nan "),
    ("outlier_slots_default", 16, r"'outlier_slots_default' is 16 .*expected an integer in \[0, 15\]"),
    ("outlier_slots_default", "1", r"'outlier_slots_default' is '1' \(a str\)"),
    ("sink_tokens", -1, r"'sink_tokens' is -1 .*expected an integer in \[0, 65536\]"),
    ("sink_tokens", 10**9, r"'sink_tokens' is 1000000000 "),
    ("sink_tokens", 1.5, r"'sink_tokens' is 1.5 \(a float\)"),
    ("fisher_weighting", "magic", r"'fisher_weighting' is 'magic' .*expected one of \('fisher', 'fisher_x2', 'none'\)"),
    ("fisher_weighting", 3, r"'fisher_weighting' is 3 \(a int\)"),
    ("calibration", "16 x 2048", r"'calibration' is '16 x 2048' \(a str\)"),
    ("calibration.nsamples", "16", r"'calibration.nsamples' is '16' \(a str\)"),
    ("calibration.seqlen", -64, r"'calibration.seqlen' is -64 "),
    ("calibration.model_dtype", "float8", r"'calibration.model_dtype' is 'float8' .*expected one of"),
    ("calibration.window_starts", [0, 5, 9], r"'calibration.window_starts' is \[0, 5, 9\] .*a list of 2 non-negative"),
    ("calibration.window_starts", "0,5", r"'calibration.window_starts' is '0,5' \(a str\)"),
    ("calibration.window_starts", [0, -5], r"'calibration.window_starts' is \[0, -5\] "),
]


@pytest.mark.parametrize("field,value,match", METADATA_CASES,
                         ids=[f"{c[0]}={'DELETE' if c[1] is DELETE else repr(c[1])[:20]}" for c in METADATA_CASES])
def test_malformed_metadata_fields_are_named(folder, field, value, match):
    meta = _read_meta(folder)
    if field.startswith("files."):
        meta["files"] = dict(meta["files"])
        key = field[len("files."):]
        if value is DELETE:
            del meta["files"][key]
        else:
            meta["files"][key] = value
    else:
        _set(meta, field, value)
    _write_meta(folder, meta)
    with pytest.raises(SignpostError, match=match + FIX):
        load_signposts(folder)


@pytest.mark.parametrize("meta", [[1, 2], "signposts", 42, None], ids=["list", "str", "int", "null"])
def test_metadata_that_is_not_an_object(folder, meta):
    _write_meta(folder, meta)
    with pytest.raises(SignpostError, match=r"metadata.json is .*not a JSON object" + FIX):
        load_signposts(folder)


def _rewrite_layer(folder: str, idx: int, change, **header) -> None:
    """Replace one layer file by changed tensors and record its checksum: a consistent folder with bad numbers."""
    from safetensors import safe_open

    path = os.path.join(folder, layer_filename(idx))
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta_header = {**(f.metadata() or {}), **header}
    change(tensors)
    save_file(tensors, path, metadata=meta_header)
    meta = _read_meta(folder)
    meta["files"][layer_filename(idx)] = sha256_file(path)
    _write_meta(folder, meta)


def _scale(name, factor):
    def change(t):
        t[name] = t[name] * factor
    return change


def _assign(name, value):
    def change(t):
        t[name] = value
    return change


def _set_qnorm(name, values):
    return _assign(name, torch.tensor(values, dtype=torch.float32))


TENSOR_CASES = [
    ("key_table_x1000", _scale("key_signposts", 1000.0), r"layer 1 'key_signposts' spans \[.*outside the normalized range"),
    ("value_table_shifted", _assign("value_signposts", torch.linspace(2.0, 7.0, 16)),
     r"layer 1 'value_signposts' spans \[2, 7\], outside the normalized range \[-1, 1\]"),
    ("table_unsorted", _assign("key_signposts", torch.linspace(1.0, -1.0, 16)), r"'key_signposts' is not sorted"),
    ("upper_below_lower", lambda t: t.update(key_lower=t["key_upper"] + 1.0), r"layer 1 has key_upper < key_lower"),
    ("qnorm_negative_sd", _set_qnorm("key_qnorm", [0.0, -0.5, 0.0, 0.5]),
     r"layer 1 'key_qnorm' = \(0, -0.5, 0, 0.5\) has standard deviations"),
    ("qnorm_huge_mean", _set_qnorm("value_qnorm", [50.0, 0.5, 0.0, 0.5]), r"layer 1 'value_qnorm' .* has means"),
    ("qnorm_tiny_sd_q", _set_qnorm("key_qnorm", [0.0, 0.5, 0.0, 1e-9]), r"sd / sd_q = 5e\+08, more than a factor 8"),
    ("qnorm_sd_too_large", _set_qnorm("value_qnorm", [0.0, 300.0, 0.0, 300.0]), r"has standard deviations"),
    ("int_tensor", _assign("key_qnorm", torch.tensor([0, 1, 0, 1])), r"layer 1 'key_qnorm' has dtype torch.int64"),
    ("bool_tensor", _assign("value_signposts", torch.ones(16, dtype=torch.bool)), r"'value_signposts' has dtype torch.bool"),
    ("wrong_length_table", _assign("value_signposts", torch.linspace(-1, 1, 8)), r"'value_signposts' has shape \(8,\)"),
    ("scalar_thresholds", _assign("key_lower", torch.tensor(-1.0)), r"'key_lower' has shape \(\), expected \(2, 16\)"),
]


@pytest.mark.parametrize("name,change,match", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_absurd_tensors_with_matching_checksums_are_refused(folder, name, change, match):
    _rewrite_layer(folder, 1, change)
    with pytest.raises(SignpostError, match=match + FIX):
        load_signposts(folder)


def test_thresholds_beyond_the_float16_range_are_refused(folder):
    """1e30 is a finite float32, but no float16 key reaches it: refused for a float16 calibration or model."""
    meta = _read_meta(folder)
    meta["calibration"]["model_dtype"] = "float16"
    _write_meta(folder, meta)
    _rewrite_layer(folder, 0, lambda t: t.update(key_upper=t["key_upper"] + 1e30))
    with pytest.raises(SignpostError, match=r"layer 0 'key_upper' reaches 1e\+30, beyond the range of the model dtype "
                                            r"float16 \(max 65504\).*calibrate\.py"):
        load_signposts(folder)
    meta = _read_meta(folder)
    meta["calibration"]["model_dtype"] = "float32"
    _write_meta(folder, meta)
    sp = load_signposts(folder)  # a float32 model could have such keys
    model = make_tiny_llama()
    validate_signposts(sp, model)
    with pytest.raises(SignpostError, match=r"reaches 1e\+30, beyond the range of the model dtype float16"):
        validate_signposts(sp, model.to(torch.float16))
    sp.layers[0].key_upper[0, 0] = torch.finfo(torch.float32).max  # finite, and above the bfloat16 maximum
    with pytest.raises(SignpostError, match=r"beyond the range of the model dtype bfloat16 \(max 3.38953e\+38\)"):
        validate_signposts(sp, model.to(torch.bfloat16))


def test_swapped_layer_files_with_swapped_checksums_are_refused(folder):
    for name in (layer_filename(0), layer_filename(1)):
        os.rename(os.path.join(folder, name), os.path.join(folder, name + ".tmp"))
    os.rename(os.path.join(folder, layer_filename(0) + ".tmp"), os.path.join(folder, layer_filename(1)))
    os.rename(os.path.join(folder, layer_filename(1) + ".tmp"), os.path.join(folder, layer_filename(0)))
    meta = _read_meta(folder)
    meta["files"] = {n: sha256_file(os.path.join(folder, n)) for n in meta["files"]}
    _write_meta(folder, meta)
    with pytest.raises(SignpostError, match=r"layer_000.safetensors holds layer='1' in its header but metadata.json "
                                            r"expects layer=0; the files were renamed or mixed" + FIX):
        load_signposts(folder)


def test_layer_file_of_other_bits_is_refused(folder):
    _rewrite_layer(folder, 0, lambda t: None, bits="2")
    with pytest.raises(SignpostError, match=r"holds bits='2' in its header but metadata.json expects bits=4"):
        load_signposts(folder)


def test_malformed_in_memory_signposts_are_refused_by_the_cache():
    model = make_tiny_llama()
    sp = make_signposts(model, bits=4)
    sp.metadata["model"]["num_hidden_layers"] = "2"
    with pytest.raises(SignpostError, match=r"'model.num_hidden_layers' is '2' \(a str\)" + FIX):
        KVQuantCache({"signposts": sp}, model_config=model.config)
    sp = make_signposts(model, bits=4)
    sp.layers[0].value_signposts = sp.layers[0].value_signposts * 100
    with pytest.raises(SignpostError, match=r"layer 0 'value_signposts' spans .*outside the normalized range"):
        KVQuantCache({"signposts": sp}, model_config=model.config)
    sp = make_signposts(model, bits=4)
    sp.layers = []
    with pytest.raises(SignpostError, match=r"expected Signposts with per-layer tensors"):
        validate_signposts(sp, model)


def test_a_malformed_folder_fails_generate_with_a_signpost_error_and_the_model_still_works(folder):
    model = setup_model(make_tiny_llama())
    expected = gen(model, 2)
    meta = _read_meta(folder)
    meta["model"]["head_dim"] = "16"
    _write_meta(folder, meta)
    with pytest.raises(SignpostError, match=r"'model.head_dim' is '16' \(a str\)" + FIX):
        gen(model, 2, cache_implementation="kvquant", cache_config={"signposts": folder, "bits": 4})
    assert torch.equal(gen(model, 2), expected)


# --------------------------------------------------------------------------------------------
# paths: a file, the wrong type, the wrong bits argument
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", [METADATA_FILE, layer_filename(0)])
def test_a_signposts_path_that_is_a_file_says_so(folder, which):
    path = os.path.join(folder, which)
    with pytest.raises(SignpostError, match=r"is a file, not a folder; pass the folder written by calibrate.py.*"
                       + repr(folder).replace("'", "")):
        load_signposts(path)
    model = setup_model(make_tiny_llama())
    with pytest.raises(SignpostError, match=r"is a file, not a folder"):
        gen(model, 2, cache_implementation="kvquant", cache_config={"signposts": path, "bits": 4})


@pytest.mark.parametrize("path", [42, None, "", ["a"]], ids=["int", "none", "empty", "list"])
def test_a_signposts_path_of_the_wrong_type(path):
    with pytest.raises(SignpostError, match=r"is not a folder path; pass the folder written by calibrate.py"):
        load_signposts(path)


@pytest.mark.parametrize("bits", ["4", 5, True, 4.5])
def test_load_with_bits_of_the_wrong_type(folder, bits):
    with pytest.raises(SignpostError, match=r"bits=.* is not supported; choose one of \(2, 3, 4\)"):
        load_signposts(folder, bits=bits)


# --------------------------------------------------------------------------------------------
# the Hugging Face Hub: only the explicit hf:// form downloads
# --------------------------------------------------------------------------------------------
@pytest.fixture
def hub_calls(monkeypatch):
    """Record snapshot_download calls; by default the download fails as a missing local cache entry would."""
    import huggingface_hub

    calls = []
    state = {"result": None}

    def fake(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "local_files_only": local_files_only})
        if state["result"] is None:
            raise FileNotFoundError("not in the local cache")
        return state["result"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls, state


@pytest.mark.parametrize("offline", ["1", None])
def test_a_missing_local_path_never_downloads(monkeypatch, tmp_path, hub_calls, offline):
    calls, _ = hub_calls
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SignpostError, match=r"signpost folder 'someone/signposts' does not exist; run calibrate.py "
                       r"--output-dir someone/signposts or fix the path \(looked for '.*someone/signposts'; nothing "
                       r"was downloaded\)\. For signposts on the Hugging Face Hub write "
                       r"signposts='hf://someone/signposts'"):
        load_signposts("someone/signposts", bits=4)
    model = setup_model(make_tiny_llama())
    with pytest.raises(SignpostError, match=r"does not exist.*nothing was downloaded"):
        gen(model, 2, cache_implementation="kvquant", cache_config={"signposts": "someone/signposts", "bits": 4})
    assert calls == []


def test_hf_form_with_hub_offline_reads_only_the_local_cache_and_names_repo_and_revision(monkeypatch, hub_calls):
    calls, _ = hub_calls
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SignpostError, match=r"signposts='hf://someone/signposts@v2': HF_HUB_OFFLINE is set, so the "
                       r"Hugging Face Hub was not contacted, and repo 'someone/signposts' at revision 'v2' is not in "
                       r"the local Hugging Face cache .*unset HF_HUB_OFFLINE"):
        load_signposts("hf://someone/signposts@v2", bits=4)
    assert calls == [{"repo_id": "someone/signposts", "revision": "v2", "local_files_only": True}]
    model = setup_model(make_tiny_llama())
    with pytest.raises(SignpostError, match=r"repo 'someone/signposts' at revision 'main' is not in the local"):
        gen(model, 2, cache_implementation="kvquant", cache_config={"signposts": "hf://someone/signposts", "bits": 4})
    assert all(c["local_files_only"] for c in calls)


def test_hf_form_with_hub_offline_uses_a_cached_snapshot(monkeypatch, hub_calls, folder):
    calls, state = hub_calls
    state["result"] = os.path.dirname(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sp = load_signposts("hf://someone/signposts", bits=4, revision="abc123")
    assert sp.bits == 4 and sp.path == folder
    assert calls == [{"repo_id": "someone/signposts", "revision": "abc123", "local_files_only": True}]


def test_hf_form_online_failure_names_repo_and_revision(monkeypatch, hub_calls):
    calls, _ = hub_calls
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(SignpostError, match=r"could not download repo 'someone/signposts' at revision 'dev' from the "
                       r"Hugging Face Hub \(FileNotFoundError: not in the local cache\)"):
        load_signposts("hf://someone/signposts@dev", bits=4)
    assert calls == [{"repo_id": "someone/signposts", "revision": "dev", "local_files_only": False}]


@pytest.mark.parametrize("path", ["hf://justaname", "hf://a/b@", "hf://a/b/c", "hf://", "hf://a/b@two words"])
def test_malformed_hf_references_are_refused_without_a_download(hub_calls, path):
    calls, _ = hub_calls
    with pytest.raises(SignpostError, match=r"is not a Hugging Face Hub reference; write hf://owner/name or "
                                            r"hf://owner/name@revision"):
        load_signposts(path, bits=4)
    assert calls == []


def test_revision_needs_the_hf_form(folder, hub_calls):
    calls, _ = hub_calls
    with pytest.raises(SignpostError, match=r"revision='v1' applies to hf://owner/name paths only"):
        load_signposts(folder, revision="v1")
    with pytest.raises(SignpostError, match=r"names revision 'v1' but revision='v2' was also given"):
        load_signposts("hf://a/b@v1", revision="v2")
    assert calls == []
