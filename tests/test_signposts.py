"""Signpost files: round trip, checksums, corruption and validation against models."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import save_file

from kvquant_hf import quant
from kvquant_hf.errors import SignpostError
from kvquant_hf.models.loading import model_identity
from kvquant_hf.signposts import (
    FORMAT_VERSION,
    KIND,
    LayerSignposts,
    Signposts,
    layer_filename,
    load_signposts,
    save_signposts,
    sha256_file,
    validate_signposts,
)


def make_signposts(model=None, bits: int = 4, num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 16,
                   seed: int = 0) -> Signposts:
    """Random but well-formed signposts (matching `model` when given)."""
    if model is not None:
        ident = model_identity(model)
        num_layers, num_kv_heads, head_dim = ident["num_hidden_layers"], ident["num_key_value_heads"], ident["head_dim"]
    else:
        ident = {
            "model_type": "llama", "name_or_path": "synthetic", "num_hidden_layers": num_layers,
            "num_attention_heads": 2 * num_kv_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
            "hidden_size": 2 * num_kv_heads * head_dim,
        }
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        lower = -1 - torch.rand(num_kv_heads, head_dim, generator=g)
        layers.append(
            LayerSignposts(
                key_signposts=torch.sort(torch.rand(2**bits, generator=g) * 2 - 1).values,
                value_signposts=torch.sort(torch.rand(2**bits, generator=g) * 2 - 1).values,
                key_lower=lower,
                key_upper=lower + 0.5 + torch.rand(num_kv_heads, head_dim, generator=g),
                key_qnorm=torch.tensor([0.01, 0.5, 0.02, 0.45]),
                value_qnorm=torch.tensor([-0.01, 0.6, 0.0, 0.55]),
            )
        )
    meta = {
        "format_version": FORMAT_VERSION, "kind": KIND, "model": ident, "bits": bits, "outlier_fraction": 0.01,
        "outlier_slots_default": 1, "sink_tokens": 1, "fisher_weighting": "fisher",
        "calibration": {"nsamples": 2, "seqlen": 64, "seed": seed}, "files": {},
    }
    return Signposts(layers=layers, metadata=meta)


@pytest.fixture
def saved(tmp_path, tiny_llama):
    """tiny_llama-compatible 4-bit signposts saved under tmp_path (returns (signposts, nuq4 folder))."""
    sp = make_signposts(tiny_llama, bits=4)
    folder = save_signposts(sp, tmp_path)
    return sp, folder


def _assert_same(a: Signposts, b: Signposts) -> None:
    assert a.num_layers == b.num_layers
    for la, lb in zip(a.layers, b.layers, strict=True):
        for name in ("key_signposts", "value_signposts", "key_lower", "key_upper", "key_qnorm", "value_qnorm"):
            torch.testing.assert_close(getattr(la, name), getattr(lb, name), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------
def test_round_trip_writes_documented_layout(saved, tmp_path):
    sp, folder = saved
    assert folder == os.path.join(str(tmp_path), "nuq4")
    names = sorted(os.listdir(folder))
    assert names == ["layer_000.safetensors", "layer_001.safetensors", "metadata.json"]  # no pickle, no temp dirs
    assert sorted(os.listdir(tmp_path)) == ["nuq4"]
    umask = os.umask(0)
    os.umask(umask)
    assert all(os.stat(os.path.join(folder, n)).st_mode & 0o777 == 0o666 & ~umask for n in names)
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask
    meta = _read_json(os.path.join(folder, "metadata.json"))
    assert meta["format_version"] == 1 and meta["kind"] == "kvquant-signposts" and meta["bits"] == 4
    assert meta["files"] == {n: sha256_file(os.path.join(folder, n)) for n in names if n.endswith(".safetensors")}

    for path, bits in ((folder, None), (folder, 4), (str(tmp_path), 4), (str(tmp_path), None)):
        loaded = load_signposts(path, bits=bits)
        _assert_same(sp, loaded)
        assert loaded.path == folder
        assert (loaded.bits, loaded.num_layers, loaded.num_kv_heads, loaded.head_dim) == (4, 2, 2, 16)
        assert loaded.model_type == "llama" and loaded.outlier_fraction == 0.01 and loaded.sink_tokens == 1
        assert loaded.outlier_slots_default == 1 and loaded.fisher_weighting == "fisher"
        assert loaded.metadata["calibration"] == sp.metadata["calibration"]
        assert all(t.dtype == torch.float32 for t in loaded.layers[0].tensors().values())


def test_luts_fold_qnorm(saved):
    _, folder = saved
    layer = load_signposts(folder).layers[1]
    torch.testing.assert_close(layer.key_lut(qnorm=False), layer.key_signposts)
    torch.testing.assert_close(layer.value_lut(False), layer.value_signposts)
    mu, sd, mu_q, sd_q = layer.key_qnorm.tolist()
    torch.testing.assert_close(layer.key_lut(qnorm=True), (layer.key_signposts - mu_q) / sd_q * sd + mu)
    torch.testing.assert_close(layer.value_lut(qnorm=True), quant.apply_qnorm(layer.value_signposts, layer.value_qnorm))
    assert not torch.equal(layer.key_lut(True), layer.key_lut(False))
    zero, scale = layer.key_zero_scale()
    torch.testing.assert_close(zero, (layer.key_upper + layer.key_lower) / 2)
    torch.testing.assert_close(scale, (layer.key_upper - layer.key_lower) / 2)


def test_load_to_device_and_overwrite(tmp_path, tiny_llama):
    save_signposts(make_signposts(tiny_llama, bits=3, seed=1), tmp_path)
    second = make_signposts(tiny_llama, bits=3, seed=2)
    save_signposts(second, tmp_path)  # replaces the previous nuq3 folder
    loaded = load_signposts(tmp_path, bits=3, device="cpu")
    _assert_same(second, loaded)
    assert loaded.layers[0].key_signposts.device.type == "cpu"


def test_several_bits_need_bits_argument(tmp_path, tiny_llama):
    for b in (2, 4):
        save_signposts(make_signposts(tiny_llama, bits=b), tmp_path)
    assert load_signposts(tmp_path, bits=2).bits == 2
    with pytest.raises(SignpostError, match=r"bits \[2, 4\]; pass bits"):
        load_signposts(tmp_path)
    with pytest.raises(SignpostError, match=r"no 3-bit signposts .*available bits: \[2, 4\].*--bits 3"):
        load_signposts(tmp_path, bits=3)
    with pytest.raises(SignpostError, match="holds 4-bit signposts but bits=2"):
        load_signposts(os.path.join(tmp_path, "nuq4"), bits=2)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(SignpostError, match="does not exist; run calibrate.py"):
        load_signposts(tmp_path / "nope")
    with pytest.raises(SignpostError, match="holds no signposts"):
        load_signposts(tmp_path)


def test_save_refuses_foreign_folder(tmp_path, tiny_llama):
    os.makedirs(tmp_path / "nuq4")
    (tmp_path / "nuq4" / "notes.txt").write_text("mine")
    with pytest.raises(SignpostError, match="not a signpost folder; refusing to overwrite"):
        save_signposts(make_signposts(tiny_llama), tmp_path)
    assert (tmp_path / "nuq4" / "notes.txt").read_text() == "mine"


def test_save_rejects_bad_shapes(tmp_path, tiny_llama):
    sp = make_signposts(tiny_llama, bits=4)
    sp.layers[1].key_signposts = torch.linspace(-1, 1, 8)
    with pytest.raises(SignpostError, match=r"layer 1 'key_signposts' has shape \(8,\), expected \(16,\)"):
        save_signposts(sp, tmp_path)
    sp = make_signposts(tiny_llama, bits=4)
    sp.layers[0].value_signposts = sp.layers[0].value_signposts.flip(0)
    with pytest.raises(SignpostError, match="not sorted"):
        save_signposts(sp, tmp_path)


# --------------------------------------------------------------------------------------------
# corrupted folders
# --------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _edit_metadata(folder: str, **changes) -> None:
    path = os.path.join(folder, "metadata.json")
    meta = _read_json(path)
    meta.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f)


def _files_with(folder: str, name: str, path: str) -> dict:
    """metadata.files with the checksum of `name` updated to that of `path`."""
    return {**_read_json(os.path.join(folder, "metadata.json"))["files"], name: sha256_file(path)}


def test_unknown_format_version(saved):
    _, folder = saved
    _edit_metadata(folder, format_version=2)
    with pytest.raises(SignpostError, match="format_version=2.*reads version 1 only"):
        load_signposts(folder)


def test_wrong_kind_and_bad_json(saved):
    _, folder = saved
    _edit_metadata(folder, kind="something-else")
    with pytest.raises(SignpostError, match="does not hold kvquant signposts"):
        load_signposts(folder)
    with open(os.path.join(folder, "metadata.json"), "w") as f:
        f.write('{"format_version": 1, "kind": ')
    with pytest.raises(SignpostError, match="not valid JSON"):
        load_signposts(folder)


def test_missing_layer_file(saved):
    _, folder = saved
    os.remove(os.path.join(folder, layer_filename(1)))
    with pytest.raises(SignpostError, match=r"layer_001.safetensors is missing \(2 layer files expected\)"):
        load_signposts(folder)


def test_truncated_file(saved):
    _, folder = saved
    path = os.path.join(folder, layer_filename(0))
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(SignpostError, match="layer_000.safetensors is truncated or corrupted"):
        load_signposts(folder)
    Path(path).write_bytes(b"\x00" * 4)  # not even a header
    with pytest.raises(SignpostError, match="truncated or corrupted"):
        load_signposts(folder)


def test_checksum_mismatch(saved):
    _, folder = saved
    path = os.path.join(folder, layer_filename(1))
    data = bytearray(Path(path).read_bytes())
    data[-4:] = struct.pack("<f", 0.123)  # still a valid file with finite values, different content
    Path(path).write_bytes(bytes(data))
    with pytest.raises(SignpostError, match="checksum mismatch for .*layer_001.safetensors"):
        load_signposts(folder)


def test_wrong_tensor_shape_in_file(saved):
    sp, folder = saved
    path = os.path.join(folder, layer_filename(0))
    tensors = sp.layers[0].tensors()
    tensors["key_lower"] = tensors["key_lower"][:1]
    save_file(tensors, path)
    _edit_metadata(folder, files=_files_with(folder, layer_filename(0), path))
    with pytest.raises(SignpostError, match=r"layer 0 'key_lower' has shape \(1, 16\), expected \(2, 16\)"):
        load_signposts(folder)


def test_missing_tensor_in_file(saved):
    sp, folder = saved
    path = os.path.join(folder, layer_filename(1))
    tensors = sp.layers[1].tensors()
    del tensors["value_qnorm"]
    save_file(tensors, path)
    _edit_metadata(folder, files=_files_with(folder, layer_filename(1), path))
    with pytest.raises(SignpostError, match=r"lacks tensors \['value_qnorm'\]"):
        load_signposts(folder)


# --------------------------------------------------------------------------------------------
# validation against a model
# --------------------------------------------------------------------------------------------
def test_validate_matching_model_config_and_dict(saved, tiny_llama):
    _, folder = saved
    sp = load_signposts(folder)
    validate_signposts(sp, tiny_llama)
    validate_signposts(sp, tiny_llama.config, bits=4)
    validate_signposts(sp, model_identity(tiny_llama))


def test_validate_layer_count(saved):
    sp = load_signposts(saved[1])
    with pytest.raises(SignpostError, match="calibrated for 2 layers, the model has 3; run calibrate.py on this model"):
        validate_signposts(sp, make_tiny_llama(num_hidden_layers=3))


def test_validate_kv_heads(saved, tiny_llama_mha):
    sp = load_signposts(saved[1])
    with pytest.raises(SignpostError, match="calibrated for 2 key/value heads, the model has 4; run calibrate.py"):
        validate_signposts(sp, tiny_llama_mha)


def test_validate_head_dim(saved, tiny_llama):
    sp = load_signposts(saved[1])
    cfg = tiny_llama.config.__class__(**{**tiny_llama.config.to_dict(), "head_dim": 32})
    with pytest.raises(SignpostError, match="calibrated for 16 head_dim, the model has 32"):
        validate_signposts(sp, cfg)


def test_validate_model_type(saved, tiny_llama):
    from transformers import MistralConfig

    sp = load_signposts(saved[1])
    c = tiny_llama.config
    cfg = MistralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                        head_dim=c.head_dim)
    with pytest.raises(SignpostError, match="model_type='llama', the model is 'mistral'; run calibrate.py"):
        validate_signposts(sp, cfg)


def test_validate_bits(saved, tiny_llama):
    sp = load_signposts(saved[1])
    with pytest.raises(SignpostError, match=r"4-bit \(nuq4\) quantization but bits=3 was requested.*bits=3"):
        validate_signposts(sp, tiny_llama, bits=3)


def test_validate_inconsistent_metadata(saved, tiny_llama):
    sp = load_signposts(saved[1])
    sp.metadata["model"]["num_key_value_heads"] = 4
    with pytest.raises(SignpostError, match="metadata says num_key_value_heads=4 but the tensors have 2"):
        validate_signposts(sp, tiny_llama)


def test_hub_repo_id_uses_snapshot(monkeypatch, tmp_path, tiny_llama):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    save_signposts(make_signposts(tiny_llama, bits=2), tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, revision, allow_patterns, local_files_only))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sp = load_signposts("hf://someone/kvquant-signposts@v1", bits=2)
    assert sp.bits == 2 and calls == [("someone/kvquant-signposts", "v1", ["nuq2/*", "metadata.json", "*.safetensors"],
                                       False)]

    def offline(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SignpostError, match="could not download repo 'someone/other' at revision 'main' from the"):
        load_signposts("hf://someone/other", bits=2)
