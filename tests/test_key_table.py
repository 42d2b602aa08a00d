"""Calibration option ``key_table``: "auto" (the default: uniform at 3 and 4 bits, k-means at 2), k-means,
pinned-endpoint and uniform key tables; only the key tables change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import calibrate as calibrate_cli
from kvquant_hf import quant
from kvquant_hf.calibration import KEY_TABLES, calibrate, weighted_kmeans_1d_pinned
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.signposts import load_signposts

FAST = {"kmeans_n_init": 1, "progress": False}


def token_stream(n: int = 4000, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_pinned_table_keeps_the_ends_and_is_a_lloyd_fixed_point():
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0, 0.35, 50_000), -1, 1)  # mass in the middle: plain k-means pulls the ends in
    c = weighted_kmeans_1d_pinned(x, None, 8)
    assert c.shape == (8,) and c.dtype == torch.float32
    assert c[0] == -1.0 and c[-1] == 1.0 and torch.all(c[1:] > c[:-1])
    # every interior entry is the mean of its nearest-signpost cell
    cell = quant.encode_nearest(torch.tensor(x, dtype=torch.float32), c).numpy()
    for j in range(1, 7):
        assert abs(x[cell == j].mean() - float(c[j])) < 1e-4
    # weights move interior entries toward heavy points; the ends stay
    w = np.where(x > 0.3, 50.0, 1.0)
    cw = weighted_kmeans_1d_pinned(x, w, 8)
    assert cw[0] == -1.0 and cw[-1] == 1.0 and torch.all(cw[1:-1] > c[1:-1])
    # deterministic
    assert torch.equal(c, weighted_kmeans_1d_pinned(x, None, 8))
    with pytest.raises(KVQuantConfigError):
        weighted_kmeans_1d_pinned(x, None, 1)


def test_key_table_option_changes_only_the_key_tables(tiny_llama):
    kwargs = dict(bits=(3, 2), nsamples=3, seqlen=48, **FAST)
    ref = calibrate(tiny_llama, None, token_stream(), key_table="kmeans", **kwargs)
    auto = calibrate(tiny_llama, None, token_stream(), **kwargs)
    pinned = calibrate(tiny_llama, None, token_stream(), key_table="kmeans-pinned", **kwargs)
    uni = calibrate(tiny_llama, None, token_stream(), key_table="uniform", **kwargs)
    # the default: uniform keys at 3 bits, k-means keys at 2 bits, each recorded
    assert auto[3].metadata["calibration"]["key_table"] == "uniform"
    assert auto[2].metadata["calibration"]["key_table"] == "kmeans"
    torch.testing.assert_close(auto[3].layers[0].key_signposts, quant.uniform_signposts(3).float())
    for la, lr in zip(auto[2].layers, ref[2].layers, strict=True):
        assert torch.equal(la.key_signposts, lr.key_signposts)
    assert ref[3].metadata["calibration"]["key_table"] == "kmeans"
    assert pinned[3].metadata["calibration"]["key_table"] == "kmeans-pinned"
    assert uni[2].metadata["calibration"]["key_table"] == "uniform"
    for b in (3, 2):
        for lr, lp, lu in zip(ref[b].layers, pinned[b].layers, uni[b].layers, strict=True):
            assert lp.key_signposts[0] == -1.0 and lp.key_signposts[-1] == 1.0
            assert torch.all(lp.key_signposts[1:] > lp.key_signposts[:-1])
            assert lr.key_signposts.abs().max() < 1.0  # plain k-means pulls the ends inward
            torch.testing.assert_close(lu.key_signposts, quant.uniform_signposts(b).float())
            for other in (lp, lu):  # thresholds and value tables are untouched
                assert torch.equal(other.key_lower, lr.key_lower) and torch.equal(other.key_upper, lr.key_upper)
                assert torch.equal(other.value_signposts, lr.value_signposts)
    with pytest.raises(KVQuantConfigError, match="key_table"):
        calibrate(tiny_llama, None, token_stream(), key_table="nope", **kwargs)


def test_cli_key_table(tmp_path, monkeypatch, tiny_llama):
    from kvquant_hf.models import loading

    class CharTokenizer:
        def __call__(self, text, **kwargs):
            return {"input_ids": [ord(c) % 128 for c in text]}

    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: (tiny_llama, CharTokenizer()))
    text_file = tmp_path / "cal.txt"
    text_file.write_text("some calibration text. " * 200)
    out = tmp_path / "sp"
    assert calibrate_cli.build_parser().parse_args(
        ["--model", "m", "--text-file", "t", "--output-dir", "o"]).key_table == "auto"
    rc = calibrate_cli.main(["--model", "tiny", "--text-file", str(text_file), "--bits", "3", "--nsamples", "2",
                             "--seqlen", "64", "--output-dir", str(out), "--device", "cpu", "--quiet",
                             "--key-table", "kmeans-pinned"])
    assert rc == 0 and set(KEY_TABLES) == {"auto", "kmeans", "kmeans-pinned", "uniform"}
    assert calibrate_cli.build_parser().parse_args(
        ["--model", "m", "--text-file", "t", "--output-dir", "o", "--value-table", "uniform"]).value_table == "uniform"
    sp = load_signposts(out, bits=3)
    assert sp.metadata["calibration"]["key_table"] == "kmeans-pinned"
    assert all(la.key_signposts[0] == -1.0 and la.key_signposts[-1] == 1.0 for la in sp.layers)


def test_value_table_uniform_changes_only_the_value_tables(tiny_llama):
    kwargs = dict(bits=(4, 2), nsamples=3, seqlen=48, **FAST)
    ref = calibrate(tiny_llama, None, token_stream(), **kwargs)
    uni = calibrate(tiny_llama, None, token_stream(), value_table="uniform", **kwargs)
    both = calibrate(tiny_llama, None, token_stream(), key_table="uniform", value_table="uniform", **kwargs)
    assert "value_table" not in ref[4].metadata["calibration"]
    assert uni[4].metadata["calibration"]["value_table"] == "uniform"
    assert both[2].metadata["calibration"]["key_table"] == both[2].metadata["calibration"]["value_table"] == "uniform"
    for b in (4, 2):
        grid = quant.uniform_signposts(b).float()
        for lr, lu, lb in zip(ref[b].layers, uni[b].layers, both[b].layers, strict=True):
            assert not torch.equal(lr.value_signposts, grid)  # the reference is k-means
            torch.testing.assert_close(lu.value_signposts, grid)
            torch.testing.assert_close(lb.value_signposts, grid)
            torch.testing.assert_close(lb.key_signposts, grid)
            assert torch.equal(lu.key_signposts, lr.key_signposts)  # keys and thresholds untouched
            assert torch.equal(lu.key_lower, lr.key_lower) and torch.equal(lu.key_upper, lr.key_upper)
    with pytest.raises(KVQuantConfigError, match="value_table"):
        calibrate(tiny_llama, None, token_stream(), value_table="kmeans-pinned", **kwargs)


def test_uniform_tables_take_the_affine_decode_path(tiny_llama):
    """Uniform tables are recognised as a grid (the CUDA/Triton decode folds it into scale and zero)."""
    from kvquant_hf.kernels.decode_attention import affine_grid

    sp = calibrate(tiny_llama, None, token_stream(), bits=(4,), nsamples=2, seqlen=48, key_table="uniform",
                   value_table="uniform", **FAST)[4]
    assert all(affine_grid(la.key_signposts) is not None and affine_grid(la.value_signposts) is not None
               for la in sp.layers)
    ref = calibrate(tiny_llama, None, token_stream(), bits=(4,), nsamples=2, seqlen=48, **FAST)[4]
    assert any(affine_grid(la.value_signposts) is None for la in ref.layers)
