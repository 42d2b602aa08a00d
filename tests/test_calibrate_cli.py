"""calibrate.py refuses bad inputs before it loads the model: one line on stderr, exit code 2.

Each case runs calibrate.py's main() in-process with the model loader replaced by one that fails the test, so a
case passes only if the input is refused before any model loading or capture.
"""

from __future__ import annotations

import gzip
import os
import random

import pytest
import torch
from conftest import make_tiny_llama

import calibrate as calibrate_cli
from kvquant_hf import calibration
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.models import loading


@pytest.fixture
def no_model(monkeypatch):
    """The model loader and the capture fail the test if they are reached."""

    def loader(*args, **kwargs):
        pytest.fail("the model was loaded although the arguments were bad")

    def capture(*args, **kwargs):
        pytest.fail("the capture started although the arguments were bad")

    monkeypatch.setattr(loading, "load_model_and_tokenizer", loader)
    monkeypatch.setattr(calibration, "capture_calibration_sample", capture)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "cal.txt"
    path.write_text("some calibration text. " * 200, encoding="utf-8")
    return path


def _run(capsys, argv):
    rc = calibrate_cli.main(["--model", "tiny", "--quiet", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _assert_refused(capsys, argv, match):
    import re

    rc, out, err = _run(capsys, argv)
    assert rc == 2, (rc, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# the output folder
# --------------------------------------------------------------------------------------------
def _output_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    return str(tmp_path / "out"), r"output folder '.*out' is a file, not a folder"


def _output_under_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    return str(tmp_path / "out" / "sp"), r"cannot be created: '.*out' is a file; choose another --output-dir"


def _nuq_entry_is_a_file(tmp_path):
    os.makedirs(tmp_path / "sp")
    (tmp_path / "sp" / "nuq4").write_text("x")
    return str(tmp_path / "sp"), r"sp/nuq4 exists and is a file; move it away or choose another --output-dir"


def _nuq_entry_is_foreign(tmp_path):
    os.makedirs(tmp_path / "sp" / "nuq4")
    (tmp_path / "sp" / "nuq4" / "notes.txt").write_text("mine")
    return str(tmp_path / "sp"), r"sp/nuq4 exists and is not a signpost folder; refusing to overwrite it"


@pytest.mark.parametrize("make", [_output_is_a_file, _output_under_a_file, _nuq_entry_is_a_file,
                                  _nuq_entry_is_foreign])
def test_unusable_output_folders_are_refused_before_loading(capsys, tmp_path, text_file, no_model, make):
    out, match = make(tmp_path)
    _assert_refused(capsys, ["--text-file", str(text_file), "--bits", "4", "--output-dir", out, "--device", "cpu"],
                    match)


@pytest.mark.parametrize("where", ["folder", "parent"])
def test_unwritable_output_folders_are_refused_before_loading(capsys, monkeypatch, tmp_path, text_file, no_model,
                                                              where):
    locked = tmp_path / "locked"
    os.makedirs(locked)
    out = locked if where == "folder" else locked / "new" / "sp"
    if os.geteuid() == 0:  # root may write anywhere: deny the locked folder the way a read-only mount would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(locked)
                            else real_access(p, mode, **kw))
    else:
        os.chmod(locked, 0o500)
    try:
        match = r"is not writable \(permission denied\)" if where == "folder" else \
            r"cannot be created in '.*locked' \(permission denied\); choose a writable --output-dir"
        _assert_refused(capsys, ["--text-file", str(text_file), "--output-dir", str(out), "--device", "cpu"], match)
    finally:
        os.chmod(locked, 0o700)


# --------------------------------------------------------------------------------------------
# the calibration text
# --------------------------------------------------------------------------------------------
def _random_bytes(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "random.bin"
    path.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    return path, r"is a binary \(it contains NUL bytes\) file, not UTF-8 text"


def _gzip(tmp_path):
    path = tmp_path / "valid.tokens.txt.gz"
    path.write_bytes(gzip.compress(b"some calibration text. " * 200))
    return path, r"is a gzip file, not UTF-8 text; decompress or convert it first"


def _high_bytes(tmp_path):
    rng = random.Random(1)
    path = tmp_path / "noise.txt"
    path.write_bytes(bytes(rng.randrange(0x80, 0x100) for _ in range(4096)))
    return path, r"is not UTF-8 text \(byte 0x[0-9a-f]{2} at offset 0 cannot be decoded\); convert it to UTF-8"


def _latin1(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("a calibration text about caf\u00e9s. ".encode("latin-1") * 50)
    return path, r"is not UTF-8 text \(byte 0xe9 at offset 28 cannot be decoded\)"


def _utf16(tmp_path):
    path = tmp_path / "utf16.txt"
    path.write_bytes("calibration text ".encode("utf-16") * 50)
    return path, r"is a binary \(it contains NUL bytes\) file|is not UTF-8 text"


def _empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(" \n\n  \n")
    return path, r"is empty; pass a file with text to calibrate on"


def _folder(tmp_path):
    return tmp_path, r"is a folder, not a file; pass a UTF-8 text file"


def _missing(tmp_path):
    return tmp_path / "missing.txt", r"cannot read the calibration text '.*missing.txt': \[Errno 2\] No such file"


@pytest.mark.parametrize("make", [_random_bytes, _gzip, _high_bytes, _latin1, _utf16, _empty, _folder, _missing])
def test_unreadable_or_binary_texts_are_refused_before_loading(capsys, tmp_path, no_model, make):
    path, match = make(tmp_path)
    _assert_refused(capsys, ["--text-file", str(path), "--output-dir", str(tmp_path / "sp"), "--device", "cpu"],
                    match)
    assert not os.path.exists(tmp_path / "sp")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_text_without_read_permission_is_refused(capsys, tmp_path, no_model, text_file):
    os.chmod(text_file, 0o000)
    try:
        _assert_refused(capsys, ["--text-file", str(text_file), "--output-dir", str(tmp_path / "sp")],
                        r"cannot read the calibration text .*Permission denied")
    finally:
        os.chmod(text_file, 0o600)


# --------------------------------------------------------------------------------------------
# the device
# --------------------------------------------------------------------------------------------
DEVICE_CASES = [
    ("cuda", 0, r"device='cuda' but no CUDA GPU is available here \(torch.cuda.is_available\(\) is False\); use "
                r"--device cpu"),
    ("cuda:1", 0, r"device='cuda:1' but no CUDA GPU is available here"),
    ("cuda:7", 1, r"device='cuda:7' does not exist: this machine has 1 CUDA GPU\(s\) \(cuda:0 to cuda:0\)"),
    ("cuda:2", 2, r"device='cuda:2' does not exist: this machine has 2 CUDA GPU\(s\) \(cuda:0 to cuda:1\)"),
    ("gpu", 1, r"device='gpu' is not a device name; use --device cpu, cuda, cuda:N"),
    ("cuda:x", 1, r"device='cuda:x' is not a device name"),
    ("meta", 1, r"device='meta' is not supported for calibration"),
    ("mps", 0, r"device='mps' but MPS is not available here"),
]


@pytest.mark.parametrize("device,gpus,match", DEVICE_CASES, ids=[f"{c[0]}-{c[1]}gpu" for c in DEVICE_CASES])
def test_devices_that_are_not_there_are_refused_before_loading(capsys, monkeypatch, tmp_path, text_file, no_model,
                                                                device, gpus, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    _assert_refused(capsys, ["--text-file", str(text_file), "--output-dir", str(tmp_path / "sp"), "--device", device],
                    match)


# --------------------------------------------------------------------------------------------
# numbers that the capture would only trip over later
# --------------------------------------------------------------------------------------------
NUMBER_CASES = [
    (["--nsamples", "0"], r"nsamples=0 must be an integer >= 1 \(--nsamples\)"),
    (["--seqlen", "1"], r"seqlen=1 must be an integer >= 2 \(--seqlen\)"),
    (["--seqlen", "64", "--sink-tokens", "63"], r"sink_tokens=63 must be in \[0, seqlen - 1\) \(seqlen=64\).*--sink-tokens"),
    (["--sink-tokens", "-1"], r"sink_tokens=-1 must be a non-negative integer"),
    (["--outlier-fraction", "0.5"], r"outlier_fraction=0.5 must be in \[0, 0.1\]"),
    (["--outlier-fraction", "nan"], r"outlier_fraction=nan must be in \[0, 0.1\]"),
    (["--max-tokens-per-layer", "0"], r"max_tokens_per_layer=0 must be an integer >= 1 \(--max-tokens-per-layer\)"),
    (["--kmeans-max-points", "3"], r"kmeans_max_points=3 must be an integer >= 16 .*4-bit table needs"),
    (["--seed", "-1"], r"seed=-1 must be an integer >= 0 \(--seed\)"),
]


@pytest.mark.parametrize("extra,match", NUMBER_CASES, ids=[" ".join(c[0]) for c in NUMBER_CASES])
def test_bad_numbers_are_refused_before_loading(capsys, tmp_path, text_file, no_model, extra, match):
    _assert_refused(capsys, ["--text-file", str(text_file), "--output-dir", str(tmp_path / "sp"), "--device", "cpu",
                             *extra], match)


# --------------------------------------------------------------------------------------------
# the library function checks the same things before the capture
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"device": "cuda:7"}, r"device='cuda:7' does not exist: this machine has 1 CUDA GPU"),
    ({"seed": -1}, r"seed=-1 must be an integer >= 0"),
    ({"max_tokens_per_layer": 0}, r"max_tokens_per_layer=0 must be an integer >= 1"),
    ({"bits": ["4"]}, r"bits=\['4'\] is not supported"),
    ({"kmeans_max_points": 8, "bits": 4}, r"kmeans_max_points=8 must be an integer >= 16"),
])
def test_calibrate_checks_arguments_before_the_capture(monkeypatch, no_model, kwargs, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model = make_tiny_llama()
    ids = torch.arange(400) % 100
    with pytest.raises(KVQuantConfigError, match=match):
        calibration.calibrate(model, None, ids, nsamples=2, seqlen=32, progress=False, **kwargs)
    assert next(model.parameters()).device.type == "cpu"
