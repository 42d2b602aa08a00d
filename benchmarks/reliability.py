"""Try every kind of careless or hostile input on tiny random models and record what happens.

The cases come in groups (bad settings and signpost folders, left padding, threads, all-padding masks, planner
and generate inputs, saved caches, malformed signposts, ``calibrate.py`` arguments). Each row: the case, the
expected outcome, the observed one (error type and the first line of its message, or the measured result), and
whether it is handled: the observed outcome is the expected one and the state is intact (a valid generate right
after it equals the reference made before anything was tried, and a user cache object that saw the failure
gives the same tokens again after ``reset()``).

Usage (about half a minute on CPU; ``--smoke``: the first few cases of each group, a few seconds)::

    python -m benchmarks.reliability
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

import kvquant_hf
from benchmarks.common import md_table, write_result
from benchmarks.reliability_cases import (
    describe,
    greedy,
    padding_cases,
    planner_cases,
    shorten,
    signpost_cases,
    thread_cases,
)
from kvquant_hf.cache import resolve_backend
from kvquant_hf.errors import KVQuantError
from kvquant_hf.generation import cache_kwarg_name
from kvquant_hf.signposts import METADATA_FILE, layer_filename, save_signposts, sha256_file

NAME = "reliability"

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 77, 31, 64, 12]])
NEW = 8


def tiny(kind: str = "llama", layers: int = 2, kv_heads: int = 2, seed: int = 0, head_dim: int = 16, window: int = 8):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(head_dim=16, sliding_window=window, **common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(head_dim=head_dim, **common))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def random_signposts(model=None, bits=4, layers=2, kv_heads=2, head_dim=16, model_type="llama", seed=0):
    from kvquant_hf.models.loading import model_identity
    from kvquant_hf.signposts import FORMAT_VERSION, KIND, LayerSignposts, Signposts

    if model is not None:
        ident = model_identity(model)
        layers, kv_heads, head_dim = ident["num_hidden_layers"], ident["num_key_value_heads"], ident["head_dim"]
    else:
        ident = {"model_type": model_type, "name_or_path": "synthetic", "num_hidden_layers": layers,
                 "num_attention_heads": 4, "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_size": 64}
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        lower = -1 - torch.rand(kv_heads, head_dim, generator=g)
        out.append(LayerSignposts(
            key_signposts=torch.sort(torch.rand(2**bits, generator=g) * 2 - 1).values,
            value_signposts=torch.sort(torch.rand(2**bits, generator=g) * 2 - 1).values,
            key_lower=lower, key_upper=lower + 1.5 + torch.rand(kv_heads, head_dim, generator=g),
            key_qnorm=torch.tensor([0.0, 1.0, 0.0, 1.0]), value_qnorm=torch.tensor([0.0, 1.0, 0.0, 1.0])))
    meta = {"format_version": FORMAT_VERSION, "kind": KIND, "model": ident, "bits": bits, "outlier_fraction": 0.01,
            "outlier_slots_default": 1, "sink_tokens": 1, "fisher_weighting": "fisher", "calibration": {}, "files": {}}
    return Signposts(layers=out, metadata=meta)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the first few cases of each group only (checks the script)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from more threads, and lose much on busy shared cores
    try:
        with warnings.catch_warnings(), torch.no_grad():  # scoped: the caller's warning filters and grad mode stay
            warnings.simplefilter("ignore")
            return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> int:
    """Every case in turn; writes the result pair and returns the exit status."""

    tmp = Path(tempfile.mkdtemp(prefix="kvq-reliability-"))
    model = tiny()
    kw = cache_kwarg_name(model)
    sp = random_signposts(model, bits=4)
    good_dir = tmp / "good"
    save_signposts(sp, good_dir)
    good_cfg = {"signposts": str(good_dir), "bits": 4}

    def gen(m=None, n=NEW, **kwargs):
        return (m or model).generate(PROMPT, max_new_tokens=n, do_sample=False, **kwargs)

    reference = gen(cache_implementation="kvquant", cache_config=good_cfg)
    user_cache = kvquant_hf.KVQuantCache(good_cfg, model_config=model.config)
    assert torch.equal(gen(**{kw: user_cache}), reference)
    user_cache.reset()

    def intact() -> str:
        ok = torch.equal(gen(cache_implementation="kvquant", cache_config=good_cfg), reference)
        user_cache.reset()
        ok_user = torch.equal(gen(**{kw: user_cache}), reference)
        user_cache.reset()
        return "yes" if ok and ok_user else f"NO (string form {ok}, cache object {ok_user})"

    def damaged(how: str) -> str:
        folder = tmp / f"damaged-{how}"
        shutil.rmtree(folder, ignore_errors=True)
        save_signposts(random_signposts(model, bits=4), folder)
        nuq = folder / "nuq4"
        path = nuq / layer_filename(1)
        meta_path = nuq / METADATA_FILE
        if how == "missing":
            path.unlink()
        elif how == "truncated":
            path.write_bytes(path.read_bytes()[:100])
        elif how == "corrupted":
            data = bytearray(path.read_bytes())
            data[-1] ^= 1
            path.write_bytes(bytes(data))
        elif how == "version":
            meta = json.loads(meta_path.read_text())
            meta["format_version"] = 2
            meta_path.write_text(json.dumps(meta))
        elif how == "metadata_pickle":
            meta_path.write_bytes(pickle.dumps(Payload(str(tmp / "PWNED"))))
        elif how == "layer_pickle":
            path.write_bytes(pickle.dumps(Payload(str(tmp / "PWNED"))))
            meta = json.loads(meta_path.read_text())
            meta["files"][layer_filename(1)] = sha256_file(str(path))  # checksum matches the pickle
            meta_path.write_text(json.dumps(meta))
        elif how == "nan_threshold":
            from safetensors.torch import save_file

            tensors = random_signposts(model, bits=4).layers[1].tensors()
            tensors["key_upper"][0, 3] = float("nan")
            save_file(tensors, str(path))
            meta = json.loads(meta_path.read_text())
            meta["files"][layer_filename(1)] = sha256_file(str(path))  # consistent folder, bad numbers
            meta_path.write_text(json.dumps(meta))
        elif how == "extra_pickles":
            for name in ("layer_000.pt", "signposts.pkl", "metadata.bin"):
                (nuq / name).write_bytes(pickle.dumps(Payload(str(tmp / "PWNED"))))
        return str(folder)

    def mismatched(**shape) -> str:
        folder = tmp / ("mm-" + "-".join(f"{k}{v}" for k, v in shape.items()))
        save_signposts(random_signposts(**shape), folder)
        return str(folder)

    def poison(layer_idx, call, value=float("nan"), target="k_proj"):
        state = {"n": 0}

        def hook(_m, _i, out):
            state["n"] += 1
            if state["n"] - 1 == call:
                out = out.clone()
                out[:, -1] = value
                return out
            return None

        return getattr(model.model.layers[layer_idx].self_attn, target).register_forward_hook(hook)

    def with_version(v):
        tf = sys.modules["transformers"]  # the module object check_transformers_version will import
        old = tf.__version__
        tf.__version__ = v
        try:
            return gen(cache_implementation="kvquant", cache_config=good_cfg)
        finally:
            tf.__version__ = old

    def dtype_change():
        cache = kvquant_hf.KVQuantCache(good_cfg, model_config=model.config)
        model(PROMPT, **{kw: cache})
        model.to(torch.bfloat16)
        try:
            model(PROMPT[:, :1], **{kw: cache})
        finally:
            model.to(torch.float32)

    def batch_change():
        model(PROMPT, **{kw: user_cache})
        model(torch.ones(3, 1, dtype=torch.long), **{kw: user_cache})

    def device_change():
        from kvquant_hf.config import KVQuantConfig
        from kvquant_hf.layer_api import AttendInputs, RopeContext

        layer = kvquant_hf.KVQuantLayer(KVQuantConfig(), 0, sp.layers[0], sp.layers[0])
        inv = 1.0 / (10000 ** (torch.arange(0, 16, 2) / 16))

        def inputs(n, p0, device="cpu"):
            pos = torch.arange(p0, p0 + n)[None]
            rope = RopeContext(None, None, inv)
            rope.cos, rope.sin = rope.cos_sin(pos)
            x = torch.randn(1, 2, n, 16)
            return AttendInputs(torch.randn(1, 4, n, 16), x.to(device), x.clone().to(device), pos, rope, None,
                                0.25, None)

        layer.attend(inputs(5, 0))
        layer.attend(inputs(1, 5, "meta"))

    def nan_error():
        h = poison(1, 3)
        try:
            gen(**{kw: user_cache})
        finally:
            h.remove()

    def lengths_after(fn):
        def run():
            try:
                fn()
            finally:
                lengths = {layer.get_seq_length() for layer in user_cache.layers}
                run.note = f"cache layers hold {sorted(lengths)} tokens afterwards (all alike)"
                user_cache.reset()
        return run

    def nan_zero():
        h = poison(0, 2, float("inf"), "v_proj")
        try:
            out = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                                 output_scores=True, cache_implementation="kvquant",
                                 cache_config={**good_cfg, "nonfinite": "zero"})
        finally:
            h.remove()
        cache = getattr(out, "cache", None) or out.past_key_values
        finite = all(bool(torch.isfinite(s).all()) for s in out.scores)
        return (f"contained: n_nonfinite={cache.memory_stats()['n_nonfinite']}, every later score finite={finite}, "
                f"value scales finite={all(bool(torch.isfinite(layer.v_scale).all()) for layer in cache.layers)}")

    def slots_exhausted():
        narrow = random_signposts(model, bits=4)
        for layer in narrow.layers:
            layer.key_lower = torch.full_like(layer.key_lower, -0.01)
            layer.key_upper = torch.full_like(layer.key_upper, 0.01)
        out = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                             cache_implementation="kvquant", cache_config={"signposts": narrow, "bits": 4})
        cache = getattr(out, "cache", None) or out.past_key_values
        st = cache.memory_stats()
        return (f"handled: clipped to the threshold and counted, n_clipped={st['n_clipped']}, "
                f"outlier_slots={st['outlier_slots']}, slot fill {st['key_outlier_slot_fill']:.2f}")

    def triton_missing():
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "triton" else real(name, *a)
        try:
            resolve_backend("triton", torch.device("cuda"), 128)
        finally:
            importlib.util.find_spec = real

    g = lambda **cfg: (lambda: gen(cache_implementation="kvquant", cache_config=cfg))
    cases = [
        ("cache_config bits=5", g(bits=5)),
        ("cache_config bits='4' (a string)", g(bits="4")),
        ("cache_config key_bits=8", g(key_bits=8)),
        ("cache_config outlier_fraction=0.5", g(outlier_fraction=0.5)),
        ("cache_config outlier_slots=17", g(outlier_slots=17)),
        ("cache_config sink_tokens=100", g(sink_tokens=100)),
        ("cache_config nonfinite='ignore'", g(nonfinite="ignore")),
        ("cache_config backend='cuda'", g(backend="cuda")),
        ("cache_config with an unknown key 'nbits'", g(nbits=4)),
        ("cache_config that is a list", lambda: gen(cache_implementation="kvquant", cache_config=[("bits", 4)])),
        ("qnorm=True without signposts", g(qnorm=True)),
        ("signposts for 3 layers (model has 2)", g(signposts=mismatched(layers=3), bits=4)),
        ("signposts for 4 KV heads (model has 2)", g(signposts=mismatched(kv_heads=4), bits=4)),
        ("signposts for head_dim 32 (model has 16)", g(signposts=mismatched(head_dim=32), bits=4)),
        ("signposts for model_type mistral on a llama", g(signposts=mismatched(model_type="mistral"), bits=4)),
        ("bits=3 with a folder holding only nuq4", g(signposts=str(good_dir), bits=3)),
        ("loaded 4-bit Signposts object with bits=3", g(signposts=sp, bits=3)),
        ("signpost folder that does not exist", g(signposts=str(tmp / "nowhere"), bits=4)),
        ("signpost layer file missing", g(signposts=damaged("missing"), bits=4)),
        ("signpost layer file truncated", g(signposts=damaged("truncated"), bits=4)),
        ("signpost layer file with one bit flipped", g(signposts=damaged("corrupted"), bits=4)),
        ("signpost format_version 2", g(signposts=damaged("version"), bits=4)),
        ("metadata.json replaced by a malicious pickle", g(signposts=damaged("metadata_pickle"), bits=4)),
        ("layer file replaced by a malicious pickle (checksum updated)", g(signposts=damaged("layer_pickle"), bits=4)),
        ("malicious pickles added next to valid files", g(signposts=damaged("extra_pickles"), bits=4)),
        ("signpost file with a NaN threshold (checksum updated)", g(signposts=damaged("nan_threshold"), bits=4)),
        ("unsupported architecture (Qwen2)", lambda: gen(tiny("qwen2"), cache_implementation="kvquant")),
        ("float64 model", lambda: gen(tiny().to(torch.float64), cache_implementation="kvquant")),
        ("head_dim 24 (not a multiple of 16)", lambda: gen(tiny(head_dim=24), cache_implementation="kvquant")),
        ("transformers 4.46.0", lambda: with_version("4.46.0")),
        ("transformers 6.0.0", lambda: with_version("6.0.0")),
        ("backend='triton' on a CPU model", g(backend="triton")),
        ("backend='triton' on CUDA without the triton package", triton_missing),
        ("cuda_graph=True on CPU", g(cuda_graph=True)),
        ("both cache_implementation and a cache object",
         lambda: gen(cache_implementation="kvquant", **{kw: user_cache})),
        ("model dtype changed to bf16 mid-sequence", dtype_change),
        ("keys on another device than the cache (meta)", device_change),
        ("batch size changed mid-sequence (user cache)", lengths_after(batch_change)),
        ("NaN in layer-1 keys in the 3rd decode forward (nonfinite='error')", lengths_after(nan_error)),
        ("Inf in layer-0 values in the 2nd decode forward (nonfinite='zero')", nan_zero),
        ("key outliers beyond the slots (thresholds +-0.01)", slots_exhausted),
    ]

    smoke = 2 if args.smoke else None
    groups = [(FIRST_GROUP, [(desc, EXPECTED.get(desc, "a typed KVQuantError"), recorded(desc, fn)) for desc, fn in
                             cases[:4 if args.smoke else None]])]
    ctx = SimpleNamespace(model=model, prompt=PROMPT, tmp=tmp, tiny=tiny, random_signposts=random_signposts)
    groups += [(title, make(ctx)[:smoke]) for title, make in GROUPS]
    rows = []
    for group, group_cases in groups:
        for desc, expected, check in group_cases:
            start = time.perf_counter()
            try:
                observed, handled = check()
            except Exception as exc:  # noqa: BLE001 - a check that fails is an outcome to record
                observed, handled = f"check failed: {describe(exc)}", False
            row = {"group": group, "case": desc, "expected": expected, "observed": observed.replace(str(tmp), "<tmp>"),
                   "state_intact": intact(), "seconds": round(time.perf_counter() - start, 2)}
            row["handled"] = "yes" if handled and row["state_intact"] == "yes" else "NO"
            rows.append(row)
            print(row, flush=True)
    pwned = (tmp / "PWNED").exists()
    shutil.rmtree(tmp, ignore_errors=True)

    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ").replace(str(tmp), "<tmp>")

    all_ok = all(r["handled"] == "yes" for r in rows) and not pwned
    n_handled = sum(r["handled"] == "yes" for r in rows)
    md = [
        "# Reliability: careless and hostile inputs on tiny random models (CPU)",
        "",
        f"{len(rows)} cases in {len(groups)} groups, {n_handled} handled. *handled* = the observed outcome is the "
        "expected one (a typed error of the package naming what is wrong, or the documented result) and the state "
        "is intact: right afterwards, a valid `generate` (string form, and a user `KVQuantCache` after `reset()`) "
        f"equals the reference made before anything was tried. Malicious pickle executed: "
        f"**{'YES' if pwned else 'no'}**. All handled: **{all_ok}**.",
    ]
    for group, _ in groups:
        group_rows = [{k: cell(v) for k, v in r.items()} for r in rows if r["group"] == group]
        md += ["", f"## {group} ({len(group_rows)} cases)", "",
               md_table(group_rows, ["case", "expected", "observed", "handled"])]
    meta = {"all_handled": all_ok, "pickle_executed": pwned, "cases": len(rows), "handled": n_handled}
    print(write_result(NAME, rows, "\n".join(md), meta=meta, device="cpu"))
    return 0 if all_ok else 1


def recorded(desc, fn):
    """A check for the first group: a typed error is handled, and so is a documented containment."""

    def check():
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - recording every outcome is the point
            observed, ok = describe(exc), isinstance(exc, KVQuantError)
        else:
            observed = result if isinstance(result, str) else "accepted"
            ok = desc in EXPECTED and "=False" not in observed
        note = getattr(fn, "note", None)
        return (observed + f" [{note}]" if note else observed), ok

    return check


FIRST_GROUP = "Bad settings, signpost folders and mid-sequence changes"
EXPECTED = {
    "malicious pickles added next to valid files": "ignored (only JSON and safetensors are read), nothing executed",
    "Inf in layer-0 values in the 2nd decode forward (nonfinite='zero')": "contained: stored as zeros, later scores finite",
    "key outliers beyond the slots (thresholds +-0.01)": "clipped to the threshold and counted",
}


# all-padding masks without signposts
# ------------------------------------------------------------------------------------------------------------
ROW = [5, 17, 99, 3, 42, 8, 77, 31, 64, 12]


def mask_cases(ctx):
    model = ctx.model

    def like_fp(ids, mask, cfg=None):
        def check():
            fp_tokens, fp_scores = greedy(model, ids, mask)
            tokens, scores = greedy(model, ids, mask, cache_implementation="kvquant", cache_config=cfg or {})
            finite = bool(torch.isfinite(scores[torch.isfinite(fp_scores)]).all())
            return (f"generates {tuple(tokens.shape)} tokens like the fp cache {tuple(fp_tokens.shape)}; logits "
                    f"finite where the fp cache's are: {finite}"), finite and tokens.shape == fp_tokens.shape
        return check

    def real_row():
        kw = {"cache_implementation": "kvquant", "cache_config": {}}
        alone_tokens, alone_scores = greedy(model, torch.tensor([ROW]), torch.ones(1, 10, dtype=torch.long), **kw)
        tokens, scores = greedy(model, torch.tensor([ROW, ROW[::-1]]), torch.tensor([[1] * 10, [0] * 10]), **kw)
        same = torch.equal(tokens[:1], alone_tokens)
        diff = float((scores[:1] - alone_scores).abs().max())
        return (f"real row's tokens {'equal' if same else 'DIFFERENT'} to its prompt alone; max logit difference "
                f"{diff:.1e}"), same and diff <= 1e-4

    zeros = torch.zeros
    return [
        ("all-zero mask, uncalibrated, batch 1", "generates like the fp cache, finite logits",
         like_fp(torch.tensor([ROW]), zeros(1, 10, dtype=torch.long))),
        ("all-zero mask, uncalibrated, batch 2", "generates like the fp cache, finite logits",
         like_fp(torch.tensor([ROW, ROW[::-1]]), zeros(2, 10, dtype=torch.long))),
        ("all-zero mask, uncalibrated, batch 2, prefill_chunk_size=4", "generates like the fp cache, finite logits",
         like_fp(torch.tensor([ROW, ROW[::-1]]), zeros(2, 10, dtype=torch.long), {"prefill_chunk_size": 4})),
        ("one row all padding beside a real row", "generates; the real row equals its prompt alone", real_row),
    ]


# ------------------------------------------------------------------------------------------------------------
# calibrate.py
# ------------------------------------------------------------------------------------------------------------
def calibrate_cases(ctx):
    from kvquant_hf import calibration
    from kvquant_hf.models import loading

    spec = importlib.util.spec_from_file_location("calibrate", Path(__file__).resolve().parents[1] / "calibrate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    tmp = ctx.tmp / "calibrate"
    tmp.mkdir()
    text = tmp / "cal.txt"
    text.write_text("some calibration text. " * 200, encoding="utf-8")

    def refused_cli(argv, word, gpus=None, locked=None):
        def check():
            reached = []
            real = (loading.load_model_and_tokenizer, calibration.capture_calibration_sample, torch.cuda.is_available,
                    torch.cuda.device_count, os.access)
            loading.load_model_and_tokenizer = lambda *a, **k: reached.append("model loaded") or 1 / 0
            calibration.capture_calibration_sample = lambda *a, **k: reached.append("capture") or 1 / 0
            if gpus is not None:
                torch.cuda.is_available, torch.cuda.device_count = (lambda: gpus > 0), (lambda: gpus)
            if locked is not None:  # root may write anywhere: deny the folder as a read-only mount would
                os.access = lambda p, mode, **kw: False if os.path.abspath(p) == str(locked) else real[4](p, mode, **kw)
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rc = cli.main(["--model", "tiny", "--quiet", "--device", "cpu", *argv])
            except BaseException as exc:  # noqa: BLE001 - a raw error is an outcome to record
                return describe(exc), False
            finally:
                (loading.load_model_and_tokenizer, calibration.capture_calibration_sample, torch.cuda.is_available,
                 torch.cuda.device_count, os.access) = real
            lines = err.getvalue().splitlines()
            ok = rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0] and not reached
            line = shorten(lines[0] if lines else "")
            return f"exit {rc}, {len(lines)} line(s): {line}" + (f" [{', '.join(reached)}]" if reached else ""), ok
        return check

    out = str(tmp / "sp")
    (tmp / "file").write_text("x")
    (tmp / "locked").mkdir()
    (tmp / "random.bin").write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                                           .to(torch.uint8).tolist()))
    import gzip

    (tmp / "valid.txt.gz").write_bytes(gzip.compress(b"some calibration text. " * 200))
    (tmp / "latin1.txt").write_bytes("a calibration text about caf\u00e9s. ".encode("latin-1") * 50)
    (tmp / "blank.txt").write_text(" \n\n  \n")
    t = ["--text-file", str(text)]
    o = ["--output-dir", out]
    rows = [
        ("--output-dir is a file", [*t, "--output-dir", str(tmp / "file")], "is a file", {}),
        ("--output-dir under a file", [*t, "--output-dir", str(tmp / "file" / "sp")], "is a file", {}),
        ("--output-dir not writable", [*t, "--output-dir", str(tmp / "locked")], "not writable",
         {"locked": tmp / "locked"}),
        ("--text-file random bytes", ["--text-file", str(tmp / "random.bin"), *o], "binary", {}),
        ("--text-file .gz", ["--text-file", str(tmp / "valid.txt.gz"), *o], "gzip", {}),
        ("--text-file non-UTF-8 (latin-1)", ["--text-file", str(tmp / "latin1.txt"), *o], "not UTF-8", {}),
        ("--text-file whitespace-only", ["--text-file", str(tmp / "blank.txt"), *o], "is empty", {}),
        ("--text-file a folder", ["--text-file", str(tmp), *o], "is a folder", {}),
        ("--text-file missing", ["--text-file", str(tmp / "missing.txt"), *o], "No such file", {}),
        ("--device cuda without a GPU", [*t, *o, "--device", "cuda"], "no CUDA GPU", {"gpus": 0}),
        ("--device cuda:7 on a 1-GPU machine", [*t, *o, "--device", "cuda:7"], "does not exist", {"gpus": 1}),
        ("--device gpu", [*t, *o, "--device", "gpu"], "is not a device name", {"gpus": 1}),
        ("--device meta", [*t, *o, "--device", "meta"], "not supported for calibration", {}),
        ("--nsamples 0", [*t, *o, "--nsamples", "0"], "nsamples=0", {}),
        ("--seqlen 1", [*t, *o, "--seqlen", "1"], "seqlen=1", {}),
        ("--outlier-fraction 0.5", [*t, *o, "--outlier-fraction", "0.5"], "outlier_fraction=0.5", {}),
    ]
    return [(c, "exit 2, one line, model not loaded", refused_cli(argv, w, **kw)) for c, argv, w, kw in rows]

GROUPS = [
    ("Padding", padding_cases),
    ("Threads", thread_cases),
    ("All-padding masks without signposts", mask_cases),
    ("Planner and generate inputs, saved caches", planner_cases),
    ("Signposts", signpost_cases),
    ("calibrate.py", calibrate_cases),
]


if __name__ == "__main__":
    sys.exit(main())
