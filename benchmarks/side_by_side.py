"""KVQuant vs transformers' QuantizedCache (quanto backend) on SmolLM2-135M-Instruct, CPU: accuracy, memory, speed.

One table, three measurements per cache:

1. **Perplexity** on the first ``--windows`` windows of ``--seqlen`` tokens of WikiText-2 test. fp16 / nuq4 / kivi4
   go through :func:`kvquant_hf.evaluation.perplexity.evaluate_perplexity` (simulated quantization, equal to
   token-by-token decoding through the real cache). ``QuantizedCache`` has no simulated form, so it is scored by a
   direct loop: per window, one token per forward call through a fresh ``QuantizedCache`` (what decoding does; a
   single forward over the window would attend to exact K/V and give the fp16 number).
2. **Memory**: bytes each cache holds after one window (``seqlen`` tokens; QuantizedCache: the last PPL window):
   ``DynamicCache`` (the tensors' bytes),
   ``KVQuantCache.get_memory_footprint()`` (codes, scales, outlier slots, sink, positions) and for QuantizedCache
   the quanto tensors' inner buffers plus the full-precision residual window. The model runs in float32 on CPU, so
   full-precision parts are float32; the "fp16-equivalent" column halves those parts.
3. **Decode speed**: greedy ``generate`` after a ``seqlen``-token prompt, ms per new token =
   ``(t(1 + N new) - t(1 new)) / N`` (the prefill cancels), median of ``--repeats``.

Signposts: ``--signposts DIR`` (e.g. ``signposts/smollm2`` written by ``scripts/quickstart.sh``); when the folder
does not exist a small calibration (``--calib-nsamples`` x ``--calib-seqlen`` tokens of WikiText-2 validation) is
written there first and recorded in the output.

Usage (a few minutes on CPU)::

    python -m benchmarks.side_by_side --signposts /tmp/sp_side_by_side
    python -m benchmarks.side_by_side --smoke     # tiny random model, random ids, uncalibrated (checks the script)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import kvquant_hf
from benchmarks.common import random_model, write_result
from kvquant_hf.evaluation.perplexity import evaluate_perplexity, load_token_ids, make_windows
from kvquant_hf.generation import cache_kwarg_name

NAME = "side_by_side"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "wikitext-2")


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def qtensor_bytes(t) -> int:
    """Bytes of a plain tensor or of a quanto quantized tensor (sum of its inner buffers)."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(qtensor_bytes(getattr(t, n)) for n in names)
    return _tensor_bytes(t)


def quantized_cache_bytes(cache) -> tuple[int, int]:
    """``(quantized bytes, full-precision residual bytes)`` of a transformers ``QuantizedCache``."""
    q = fp = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        q += qtensor_bytes(layer._quantized_keys) + qtensor_bytes(layer._quantized_values)
        if layer.keys is not None and layer.keys.dim() == 4:
            fp += _tensor_bytes(layer.keys) + _tensor_bytes(layer.values)
    return q, fp


def dynamic_cache_bytes(cache) -> int:
    return sum(_tensor_bytes(layer.keys) + _tensor_bytes(layer.values) for layer in cache.layers
               if getattr(layer, "is_initialized", False))


def make_quantized_cache(model, nbits: int):
    from transformers import QuantizedCache

    return QuantizedCache(backend="quanto", config=model.config, nbits=nbits)


@torch.no_grad()
def quantized_cache_ppl(model, windows: torch.Tensor, nbits: int) -> tuple[float, object]:
    """PPL with one token per forward through a fresh QuantizedCache per window; returns (ppl, last cache)."""
    name = cache_kwarg_name(model)
    nll, n = 0.0, 0
    cache = None
    for w in windows:
        cache = make_quantized_cache(model, nbits)
        ids = w.view(1, -1)
        for i in range(ids.shape[1] - 1):
            out = model(ids[:, i : i + 1], **{name: cache}, use_cache=True)
            nll += float(F.cross_entropy(out.logits[0, -1].float(), ids[0, i + 1]))
            n += 1
    return float(torch.exp(torch.tensor(nll / n))), cache


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def decode_ms_per_token(model, prompt: torch.Tensor, make_kwargs, new_tokens: int, repeats: int) -> float:
    """Greedy decode speed: (t(1 + N new tokens) - t(1 new token)) / N in milliseconds."""
    common = dict(do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)

    def run(n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **common, **make_kwargs())

    run(2)()  # warm-up
    t1 = _median_time(run(1), repeats)
    tn = _median_time(run(1 + new_tokens), repeats)
    return 1000.0 * (tn - t1) / new_tokens


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text-file", default=os.path.join(DATA, "test.raw.txt"))
    ap.add_argument("--calib-file", default=os.path.join(DATA, "valid.tokens.txt"))
    ap.add_argument("--signposts", default=os.path.join(ROOT, "signposts", "smollm2"))
    ap.add_argument("--calib-nsamples", type=int, default=4)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random model on random ids, uncalibrated nuq4 (checks the script, not the numbers)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seqlen, args.windows, args.new_tokens, args.repeats = 32, 1, 4, 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    t_start = time.time()

    try:
        import optimum.quanto

        quanto_version = optimum.quanto.__version__
    except ImportError:
        quanto_version = None

    calibrated_here = None
    if args.smoke:
        model, tok = random_model("tiny", dtype=torch.float32, device="cpu"), None
        model.generation_config.pad_token_id = 0
        signposts = None  # uncalibrated: NormalFloat tables, key ranges from the first prompt
    else:
        from kvquant_hf.models.loading import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer("smollm2")
        signposts = args.signposts
    if signposts is not None and not os.path.isdir(signposts):
        from kvquant_hf.calibration import calibrate
        from kvquant_hf.signposts import save_signposts

        with open(args.calib_file, encoding="utf-8") as f:
            text = f.read()
        t0 = time.time()
        sps = calibrate(model, tok, text, bits=(4,), nsamples=args.calib_nsamples, seqlen=args.calib_seqlen,
                        progress=False, source_info={"text_file": os.path.basename(args.calib_file)})
        for sp in sps.values():
            save_signposts(sp, args.signposts)
        calibrated_here = {"nsamples": args.calib_nsamples, "seqlen": args.calib_seqlen,
                           "seconds": round(time.time() - t0, 1)}
        print(f"calibrated {args.calib_nsamples} x {args.calib_seqlen} tokens in {calibrated_here['seconds']} s")

    if args.smoke:
        ids = torch.randint(0, model.config.vocab_size, (args.seqlen * args.windows,),
                            generator=torch.Generator().manual_seed(0))
    else:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()[: 200_000]  # the first windows only need the start of the text
        ids = load_token_ids(tok, text=text)
    windows = make_windows(ids, args.seqlen, args.windows)
    rows: dict[str, dict] = {}

    # 1. perplexity ------------------------------------------------------------------------------------------
    t0 = time.time()
    res = evaluate_perplexity(model, windows.reshape(-1), ["fp16", "nuq4", "kivi4"], seqlen=args.seqlen,
                              windows=args.windows, signposts=signposts)
    print(f"harness PPL ({time.time() - t0:.0f} s):", {m: round(r["ppl"], 3) for m, r in res.items()})
    labels = (("fp16", "fp16 (DynamicCache)"), ("nuq4", "KVQuant nuq4-1%"), ("kivi4", "KIVI-4-style (simulated)"))
    for m, label in labels:
        rows[label] = {"ppl": res[m]["ppl"], "ppl_how": "evaluate_perplexity (simulated)"}
    kvquant_hf.unpatch_model(model)
    if quanto_version:
        for nbits in (4, 2):
            t0 = time.time()
            ppl, qcache = quantized_cache_ppl(model, windows, nbits)
            q, fp = quantized_cache_bytes(qcache)
            rows[f"QuantizedCache quanto int{nbits}"] = {
                "ppl": ppl, "ppl_how": "token-by-token loop", "bytes": q + fp, "bytes_fp16_equiv": q + fp // 2,
                "bytes_quantized": q, "bytes_residual": fp, "ppl_seconds": round(time.time() - t0, 1)}
            print(f"QuantizedCache int{nbits}: PPL {ppl:.3f} ({time.time() - t0:.0f} s), bytes {q} + residual {fp}")

    # 2. memory after one window -----------------------------------------------------------------------------
    from transformers import DynamicCache

    name = cache_kwarg_name(model)
    kv_config = {"bits": 4} if signposts is None else {"signposts": signposts, "bits": 4}
    w0 = windows[:1]
    with torch.no_grad():
        dc = DynamicCache(config=model.config)
        model(w0, **{name: dc}, use_cache=True)
        b = dynamic_cache_bytes(dc)
        rows["fp16 (DynamicCache)"].update(bytes=b, bytes_fp16_equiv=b // 2)
        kc = kvquant_hf.KVQuantCache(kv_config, model_config=model.config)
        kvquant_hf.patch_model(model)
        model(w0, **{name: kc}, use_cache=True)
        st = kc.memory_stats()
        rows["KVQuant nuq4-1%"].update(bytes=kc.get_memory_footprint(), bytes_fp16_equiv=None,
                                       avg_bits=st["avg_bits_per_element_all"])
        kvquant_hf.unpatch_model(model)
    rows["KIVI-4-style (simulated)"].update(bytes=None, bytes_fp16_equiv=None)

    # 3. decode speed ----------------------------------------------------------------------------------------
    prompt = windows[:1]
    speed = {
        "fp16 (DynamicCache)": dict,
        "KVQuant nuq4-1%": lambda: {"cache_implementation": "kvquant",
                                    "cache_config": kv_config},
    }
    if quanto_version:
        for nbits in (4, 2):
            speed[f"QuantizedCache quanto int{nbits}"] = (
                lambda nb=nbits: {name: make_quantized_cache(model, nb)})
    for label, kw in speed.items():
        t0 = time.time()
        rows[label]["decode_ms_per_token"] = decode_ms_per_token(model, prompt, kw, args.new_tokens, args.repeats)
        kvquant_hf.unpatch_model(model)
        print(f"{label}: {rows[label]['decode_ms_per_token']:.1f} ms/token ({time.time() - t0:.0f} s)")

    env = {"optimum_quanto": quanto_version, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "seconds": round(time.time() - t_start, 1), "load_average_end": list(os.getloadavg())}
    out = {"config": vars(args), "calibrated_here": calibrated_here, "rows": rows, "environment": env}
    md = render_md(out)
    print(md)
    row_list = [{"cache": label, **r} for label, r in rows.items()]
    write_result(NAME, row_list, md, meta={"config": vars(args), "calibrated_here": calibrated_here, **env},
                 device="cpu")
    return row_list


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def render_md(out: dict) -> str:
    cfg, env, rows = out["config"], out["environment"], out["rows"]
    base = rows["fp16 (DynamicCache)"]["ppl"]
    fp16_bytes = rows["fp16 (DynamicCache)"]["bytes_fp16_equiv"]
    lines = [
        "# KVQuant vs transformers' QuantizedCache on "
        + ("a tiny random model (smoke run)" if cfg.get("smoke") else "SmolLM2-135M-Instruct (CPU)"),
        "",
        f"WikiText-2 test, first {cfg['windows']} windows of {cfg['seqlen']} tokens; float32 model on CPU; "
        f"{env['torch_threads']} torch thread(s) on a shared {env['cpus']}-core machine"
        + (f" (load average at the end {env['load_average_end'][0]:.1f})." if env.get("load_average_end") else "."),
        "",
        f"| cache | PPL | vs fp16 | bytes after one {cfg['seqlen']}-token window (float32 model) "
        "| fp16-equivalent bytes | vs fp16 cache | decode ms/token |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in rows.items():
        eq = r.get("bytes_fp16_equiv")
        if eq is None:
            eq = r.get("bytes") if label.startswith("KVQuant") else None
        ratio = f"{fp16_bytes / eq:.2f}x smaller" if eq and not label.startswith("fp16") else ""
        lines.append(
            f"| {label} | {r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.2f}% | {_fmt(r.get('bytes'), ',')} | "
            f"{_fmt(eq, ',')} | {ratio} | {_fmt(r.get('decode_ms_per_token'), '.1f')} |")
    lines += [
        "",
        "- PPL: fp16, nuq4 and KIVI-4 from `kvquant_hf.evaluation.perplexity.evaluate_perplexity` (simulated "
        "quantization = token-by-token decoding through the cache); QuantizedCache by a loop of one token per forward "
        "through a fresh cache per window (defaults: per-channel groups of 64, a 128-token full-precision residual "
        "window that is re-quantized into the history whenever it fills).",
        "- Bytes: DynamicCache = its K/V tensors; KVQuant = `get_memory_footprint()` (its full-precision parts, the "
        "sink token, are in the model dtype; the 'fp16-equivalent' column uses the same number); QuantizedCache = "
        "quanto's packed data, scales and shifts plus the float32 residual (halved in the fp16-equivalent column). "
        "KIVI-4 is only simulated here (no packed storage).",
        *([f"- {env['note']}"] if env.get("note") else []),
        f"- Decode: greedy `generate` after a {cfg['seqlen']}-token prompt, "
        f"(t({1 + cfg['new_tokens']} new) - t(1 new)) / {cfg['new_tokens']}, median of {cfg['repeats']}; "
        "KVQuant on CPU runs the plain-PyTorch path (it dequantizes the history block by block every step; the "
        "Triton kernels are for CUDA), so on CPU it decodes slower than the fp cache.",
    ]
    if out.get("calibrated_here"):
        c = out["calibrated_here"]
        lines.append(f"- nuq4 signposts: calibrated by this script on {c['nsamples']} x {c['seqlen']} tokens of "
                     f"WikiText-2 validation ({c['seconds']} s), far less than the 16 x 2048 of the README's results "
                     "(two 512-token windows are too few to rank nuq4, KIVI-4 and int4 QuantizedCache: see "
                     "accuracy.md for the whole text).")
    lines.append(f"- {env['seconds']:.0f} s wall, optimum-quanto {env['optimum_quanto']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
