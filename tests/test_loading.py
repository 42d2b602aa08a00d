"""Model loading: the embedded-model path override."""

import pytest

from kvquant_hf.errors import KVQuantError
from kvquant_hf.models.loading import SMOLLM2_ENV, resolve_model, smollm2_gguf_path


def test_env_var_overrides_embedded_gguf(tmp_path, monkeypatch):
    f = tmp_path / "copy.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv(SMOLLM2_ENV, str(f))
    assert smollm2_gguf_path() == str(f)
    assert resolve_model("smollm2") == (str(tmp_path), "copy.gguf")


def test_env_var_pointing_nowhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(SMOLLM2_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(KVQuantError, match=SMOLLM2_ENV):
        smollm2_gguf_path()
