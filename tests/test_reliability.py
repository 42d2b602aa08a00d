"""Reliability: bad input raises a clear, catchable KVQuantError subclass and leaves the cache usable (configuration,
signposts that do not match or are damaged, signpost folders are data and never code, architectures, versions,
backends, device and dtype mismatches). CPU, tiny random models; NaN/Inf and edge values are in
test_reliability_numerics.py, the Triton kernels' edge cases in test_kernel_properties.py."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from cache_helpers import HEAD_DIM, calibrated_layer_signposts, forward, synthetic_inputs
from conftest import make_tiny_llama, make_tiny_mistral
from reliability_helpers import gen, setup_model, small_layer
from test_signposts import make_signposts as random_signposts

from kvquant_hf import quant
from kvquant_hf.cache import KVQuantCache, KVQuantLayer, resolve_backend
from kvquant_hf.config import NONFINITE_POLICIES, KVQuantConfig
from kvquant_hf.errors import (
    BackendUnavailableError,
    CacheMismatchError,
    KVQuantConfigError,
    KVQuantError,
    SignpostError,
    UnsupportedModelError,
)
from kvquant_hf.models import patch_model
from kvquant_hf.signposts import METADATA_FILE, layer_filename, load_signposts, save_signposts, sha256_file

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::kvquant_hf.UncalibratedCacheWarning")


# --------------------------------------------------------------------------------------------
# 1. configuration: every bad value names the allowed ones
# --------------------------------------------------------------------------------------------
BAD_CONFIGS = [
    ({"bits": 5}, r"bits=5 .*\(2, 3, 4\)"),
    ({"bits": 4.0}, r"bits=4.0 .*\(2, 3, 4\)"),
    ({"key_bits": 1}, r"key_bits=1 .*\(2, 3, 4\)"),
    ({"value_bits": 8}, r"value_bits=8 .*\(2, 3, 4\)"),
    ({"outlier_fraction": 0.5}, r"outlier_fraction=0.5 .*\[0, 0.1\]"),
    ({"outlier_fraction": -0.01}, r"\[0, 0.1\]"),
    ({"outlier_fraction": float("nan")}, r"\[0, 0.1\]"),
    ({"outlier_slots": 17}, r"outlier_slots=17 .*\[0, 16\]"),
    ({"sink_tokens": 65}, r"sink_tokens=65 .*\[0, 64\]"),
    ({"sink_tokens": -1}, r"\[0, 64\]"),
    ({"backend": "cuda"}, r"backend='cuda' .*\('auto', 'torch', 'triton'\)"),
    ({"nonfinite": "ignore"}, r"nonfinite='ignore' .*\('error', 'zero'\)"),
    ({"block_size": 10}, r"multiple of 16"),
    ({"prefill_chunk_size": -1}, r"prefill_chunk_size"),
    ({"cuda_graph": "yes"}, r"cuda_graph"),
    ({"qnorm": 1}, r"qnorm=1 must be True or False"),
    ({"signposts": 42}, r"signposts=int .*calibrate.py"),
    ({"nbits": 4}, r"unknown cache_config key.*'nbits'.*allowed keys are \[.*'bits'.*'nonfinite'"),
]


@pytest.mark.parametrize("bad,match", BAD_CONFIGS, ids=lambda x: str(x)[:40])
def test_bad_cache_config_values_list_the_allowed_ones(bad, match):
    with pytest.raises(KVQuantConfigError, match=match):
        KVQuantConfig.from_dict(bad)
    assert issubclass(KVQuantConfigError, KVQuantError)


def test_bad_cache_config_through_generate_leaves_the_model_usable():
    model = setup_model(make_tiny_llama())
    expected = gen(model, cache_implementation="kvquant")
    for bad, match in BAD_CONFIGS[:3] + BAD_CONFIGS[-2:]:
        with pytest.raises(KVQuantConfigError, match=match):
            gen(model, cache_implementation="kvquant", cache_config=bad)
    with pytest.raises(KVQuantConfigError, match="dict"):
        gen(model, cache_implementation="kvquant", cache_config=[("bits", 4)])
    assert torch.equal(gen(model, cache_implementation="kvquant"), expected)


def test_nonfinite_policies_are_documented():
    assert NONFINITE_POLICIES == ("error", "zero")
    assert KVQuantConfig().nonfinite == "error"
    assert "nonfinite" in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------------------------
# 1. signposts that do not match the model or the requested bits; damaged folders
# --------------------------------------------------------------------------------------------
MISMATCHES = [
    ("layers", {"num_layers": 3}, r"calibrated for 3 layers, the model has 2"),
    ("kv_heads", {"num_kv_heads": 4}, r"calibrated for 4 key/value heads, the model has 2"),
    ("head_dim", {"head_dim": 32}, r"calibrated for 32 head_dim, the model has 16"),
]


@pytest.mark.parametrize("what,shape,match", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_signposts_of_another_shape_are_rejected_by_generate(tmp_path, what, shape, match):
    model = setup_model(make_tiny_llama())
    save_signposts(random_signposts(bits=4, **{"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, **shape}), tmp_path)
    with pytest.raises(SignpostError, match=match + r".*calibrate.py"):
        gen(model, 2, cache_implementation="kvquant", cache_config={"signposts": str(tmp_path), "bits": 4})
    with pytest.raises(SignpostError, match=match):
        KVQuantCache({"signposts": str(tmp_path)}, model_config=model.config)


def test_signposts_of_another_model_type_or_bits_are_rejected(tmp_path):
    llama = setup_model(make_tiny_llama())
    save_signposts(random_signposts(llama, bits=4), tmp_path)
    with pytest.raises(SignpostError, match=r"no 3-bit signposts .*available bits: \[4\].*calibrate.py --bits 3"):
        gen(llama, 2, cache_implementation="kvquant", cache_config={"signposts": str(tmp_path), "bits": 3})
    with pytest.raises(SignpostError, match=r"4-bit signposts but bits=2"):
        load_signposts(os.path.join(tmp_path, "nuq4"), bits=2)
    mistral = setup_model(make_tiny_mistral())
    with pytest.raises(SignpostError, match=r"model_type='llama', the model is 'mistral'"):
        gen(mistral, 2, cache_implementation="kvquant", cache_config={"signposts": str(tmp_path), "bits": 4})


def _damage(folder: str, how: str) -> str:
    path = os.path.join(folder, layer_filename(1))
    if how == "missing_file":
        os.remove(path)
        return r"layer_001.safetensors is missing"
    if how == "truncated":
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 3])
        return r"truncated or corrupted"
    if how == "corrupted":
        data = bytearray(Path(path).read_bytes())
        data[-1] ^= 0x01  # one bit of one float: still parses
        Path(path).write_bytes(bytes(data))
        return r"checksum mismatch for .*layer_001"
    meta_path = os.path.join(folder, METADATA_FILE)
    meta = json.loads(Path(meta_path).read_text())
    if how == "version":
        meta["format_version"] = 99
        match = r"format_version=99.*reads version 1"
    elif how == "no_checksums":
        meta["files"] = {}
        match = r"lists no checksum"
    elif how == "metadata_json":
        Path(meta_path).write_text("{not json")
        return r"not valid JSON"
    elif how == "missing_folder":
        import shutil

        shutil.rmtree(folder)
        return r"does not exist|holds no signposts|metadata.json is missing"
    Path(meta_path).write_text(json.dumps(meta))
    return match


@pytest.mark.parametrize(
    "how", ["missing_file", "truncated", "corrupted", "version", "no_checksums", "metadata_json", "missing_folder"]
)
def test_damaged_signpost_folders_raise_and_the_model_still_generates(tmp_path, how):
    model = setup_model(make_tiny_llama())
    sp = random_signposts(model, bits=4)
    folder = save_signposts(sp, tmp_path)
    expected = gen(model, cache_implementation="kvquant", cache_config={"signposts": sp})
    match = _damage(folder, how)
    with pytest.raises(SignpostError, match=match):
        gen(model, cache_implementation="kvquant", cache_config={"signposts": str(tmp_path), "bits": 4})
    assert torch.equal(gen(model, cache_implementation="kvquant", cache_config={"signposts": sp}), expected)


# --------------------------------------------------------------------------------------------
# 5. signposts are data, never code
# --------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a marker file (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickles_in_a_signpost_folder_are_never_executed(tmp_path):
    model = setup_model(make_tiny_llama())
    sp = random_signposts(model, bits=4)
    folder = save_signposts(sp, tmp_path)
    marker = tmp_path / "PWNED"
    blob = pickle.dumps(_Payload(str(marker)))
    # extra files that a pickle-based loader might pick up: ignored
    for name in ("layer_000.pt", "layer_000.bin", "signposts.pkl", "metadata.pt"):
        Path(folder, name).write_bytes(blob)
    loaded = load_signposts(folder)
    assert loaded.num_layers == 2 and not marker.exists()
    # a layer file replaced by a pickle, with a matching checksum in metadata.json: rejected by the parser
    path = os.path.join(folder, layer_filename(0))
    Path(path).write_bytes(blob)
    meta_path = os.path.join(folder, METADATA_FILE)
    meta = json.loads(Path(meta_path).read_text())
    meta["files"][layer_filename(0)] = sha256_file(path)
    Path(meta_path).write_text(json.dumps(meta))
    with pytest.raises(SignpostError, match="truncated or corrupted"):
        load_signposts(folder)
    with pytest.raises(SignpostError):
        gen(model, 2, cache_implementation="kvquant", cache_config={"signposts": str(tmp_path), "bits": 4})
    # metadata.json replaced by a pickle
    Path(meta_path).write_bytes(blob)
    with pytest.raises(SignpostError, match="not valid JSON"):
        load_signposts(folder)
    assert not marker.exists()


def _calls_and_imports(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text())
    imports, calls = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imports.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                calls.add(f"{f.value.id}.{f.attr}")
            elif isinstance(f, ast.Name):
                calls.add(f.id)
    return imports, calls


def test_library_code_never_unpickles():
    """No module of the package or the kernels imports pickle-like loaders or calls torch.load / np.load."""
    files = sorted((ROOT / "kvquant_hf").rglob("*.py")) + sorted((ROOT / "triton_kernels").rglob("*.py"))
    assert files
    for path in files:
        imports, calls = _calls_and_imports(path)
        assert not imports & {"pickle", "dill", "joblib", "cloudpickle", "marshal", "shelve"}, path
        assert not calls & {"torch.load", "np.load", "numpy.load", "pickle.load", "pickle.loads"}, path
    _, calls = _calls_and_imports(ROOT / "kvquant_hf" / "signposts.py")
    assert "load_file" in calls and "json.load" in calls  # safetensors + JSON only


# --------------------------------------------------------------------------------------------
# 1. architectures, transformers versions, backends
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["4.46.3", "5.16.0", "6.0.0"])
def test_unsupported_transformers_versions_are_rejected(monkeypatch, version):
    import sys

    model = setup_model(make_tiny_llama())
    transformers = sys.modules["transformers"]  # the object check_transformers_version imports
    installed = transformers.__version__
    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(UnsupportedModelError, match=rf"transformers {version} is not supported.*>=5.17,<6"):
        gen(model, 2, cache_implementation="kvquant")
    monkeypatch.setattr(transformers, "__version__", installed)
    gen(model, 2, cache_implementation="kvquant")


def test_triton_backend_without_gpu_or_without_triton(monkeypatch):
    with pytest.raises(BackendUnavailableError, match=r"need a CUDA device.*backend='torch'"):
        resolve_backend("triton", torch.device("cpu"), 64)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    with pytest.raises(BackendUnavailableError, match=r"`triton` package is not installed.*backend='torch'"):
        resolve_backend("triton", torch.device("cuda"), 64)
    assert resolve_backend("auto", torch.device("cuda"), 64) == "torch"
    with pytest.raises(BackendUnavailableError, match="power-of-two head_dim"):
        resolve_backend("triton", torch.device("cuda"), 48)
    assert issubclass(BackendUnavailableError, KVQuantError)


def test_triton_backend_through_generate_on_cpu_leaves_the_model_usable():
    model = setup_model(make_tiny_llama())
    expected = gen(model, cache_implementation="kvquant")
    with pytest.raises(BackendUnavailableError, match="backend='torch'"):
        gen(model, cache_implementation="kvquant", cache_config={"backend": "triton"})
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        gen(model, cache_implementation="kvquant", cache_config={"cuda_graph": True})
    assert torch.equal(gen(model, cache_implementation="kvquant"), expected)


# --------------------------------------------------------------------------------------------
# 1. device and dtype mismatches between model, cache and signposts
# --------------------------------------------------------------------------------------------
def test_dtype_change_mid_sequence_is_rejected_and_reset_reinitializes():
    model = patch_model(make_tiny_llama())
    cache = KVQuantCache({"bits": 4}, model_config=model.config)
    ids = torch.randint(1, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    forward(model, ids, cache)
    model.to(torch.bfloat16)
    with pytest.raises(CacheMismatchError, match=r"keys arrived as torch.bfloat16 but .* holds torch.float32.*reset"):
        forward(model, ids[:, :1], cache)
    assert [layer.get_seq_length() for layer in cache.layers] == [8, 8]
    cache.reset()
    out = forward(model, ids, cache)  # an empty cache re-initializes for the new dtype
    assert cache.layers[0].sink_k.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_device_and_key_value_mismatches_are_rejected():
    layer = small_layer()
    layer.attend(synthetic_inputs(1, 4, 2, 5, 0))
    inputs = synthetic_inputs(1, 4, 2, 1, 5)
    inputs.key = inputs.key.to("meta")
    inputs.value = inputs.value.to("meta")
    with pytest.raises(CacheMismatchError, match=r"keys arrived on meta but this layer's cache lives on cpu"):
        layer.attend(inputs)
    inputs = synthetic_inputs(1, 4, 2, 1, 5)
    inputs.value = inputs.value.to(torch.float16)
    with pytest.raises(CacheMismatchError, match=r"keys are torch.float32 .* values are torch.float16"):
        layer.attend(inputs)
    inputs = synthetic_inputs(1, 4, 2, 1, 5)
    inputs.value = inputs.value[..., :8]
    with pytest.raises(CacheMismatchError, match="same shape"):
        layer.attend(inputs)
    inputs = synthetic_inputs(2, 4, 2, 1, 5)
    with pytest.raises(CacheMismatchError, match=r"batch/heads/head_dim \(2, 2, 16\).*\(1, 2, 16\)"):
        layer.attend(inputs)
    assert layer.get_seq_length() == 5
    layer.attend(synthetic_inputs(1, 4, 2, 1, 5))  # still usable
    assert layer.get_seq_length() == 6


def test_signposts_follow_the_cache_device_and_dtype():
    """Signposts are stored float32 on CPU and moved to the cache's device/dtype when a layer initializes: a bf16
    model with float32 signposts (or float64 ones) quantizes exactly as the float32 reference."""
    h = 2
    sp64 = calibrated_layer_signposts(h)
    sp64 = type(sp64)(**{n: getattr(sp64, n).double() for n in ("key_signposts", "value_signposts", "key_lower",
                                                                 "key_upper", "key_qnorm", "value_qnorm")})
    layer = KVQuantLayer(KVQuantConfig(bits=4, outlier_slots=1, sink_tokens=0), 0, sp64, sp64)
    inputs = synthetic_inputs(1, 4, h, 6, 0, dtype=torch.bfloat16)
    layer.attend(inputs)
    assert layer.k_lut.dtype == torch.float32 and layer.k_lower.dtype == torch.float32
    ref = quant.quantize_keys(inputs.key, quant.normal_float_signposts(4), torch.full((h, HEAD_DIM), -1.5),
                              torch.full((h, HEAD_DIM), 1.5), 1, 4)
    assert torch.equal(layer.k_codes[:, :, :6], ref.codes)
