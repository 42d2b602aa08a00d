"""Show what calibrated KVQuant signposts do on a model: perplexity, generated text, memory.

Runs after ``calibrate.py`` (``scripts/quickstart.sh`` runs both)::

    python -m kvquant_hf.demo --model smollm2 --signposts signposts/smollm2 \
        --text-file ../shared/data/wikitext-2/test.raw.txt

1. WikiText-2 perplexity on the first ``--windows`` windows: fp16 vs nuq4/nuq3/nuq2 (simulated
   quantization, which equals token-by-token decoding through the real cache) and int4/KIVI-4 for scale.
2. Greedy text for one prompt with the fp cache and with ``cache_implementation="kvquant"`` side by side.
3. The real cache's memory after that generation: bytes, bits per element (and what each figure counts),
   compression vs fp16.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

#: the reference calibration recipe (windows x tokens); fewer windows run faster and calibrate worse
REFERENCE_NSAMPLES, REFERENCE_SEQLEN = 16, 2048


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def _calibration_note(signposts: str, bits: int, model_arg: str) -> str:
    """How the signposts were calibrated, and the command for the reference recipe when they used less data."""
    from kvquant_hf.signposts import load_signposts

    cal = load_signposts(signposts, bits=bits).metadata.get("calibration", {})
    n, s = cal.get("nsamples"), cal.get("seqlen")
    if n is None or s is None:
        return ""
    note = f"signposts calibrated on {n} x {s} tokens"
    if n * s < REFERENCE_NSAMPLES * REFERENCE_SEQLEN:
        note += (f", fewer than the reference {REFERENCE_NSAMPLES} x {REFERENCE_SEQLEN}: expect somewhat higher nuqX "
                 f"perplexity.\nCalibrate properly with: python calibrate.py --model {model_arg} --text-file "
                 f"../shared/data/wikitext-2/valid.tokens.txt --bits 4 3 2 --outlier-fraction 0.01 --sink-tokens 1 "
                 f"--nsamples {REFERENCE_NSAMPLES} --seqlen {REFERENCE_SEQLEN} --output-dir {signposts}")
    return note


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="model id or folder, or 'smollm2' (embedded; default)")
    ap.add_argument("--gguf-file", default=None, help="GGUF file inside --model (for GGUF checkpoints)")
    ap.add_argument("--signposts", required=True, help="folder written by calibrate.py (holding nuq4/, nuq3/, ...)")
    ap.add_argument("--text-file", required=True, help="evaluation text (WikiText-2 test.raw.txt)")
    ap.add_argument("--windows", type=int, default=2, help="perplexity windows (default: 2)")
    ap.add_argument("--seqlen", type=int, default=2048, help="tokens per perplexity window (default: 2048)")
    ap.add_argument("--prompt", default="The history of the Roman Empire", help="prompt of the greedy generation")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default: 48)")
    args = ap.parse_args(argv)

    import kvquant_hf  # noqa: F401  (registers cache_implementation="kvquant")
    from kvquant_hf.evaluation.perplexity import evaluate_perplexity
    from kvquant_hf.models.loading import load_model_and_tokenizer
    from kvquant_hf.quant import nuq_avg_bits

    model, tok = load_model_and_tokenizer(args.model, args.gguf_file)
    bits = sorted((int(n[3:]) for n in os.listdir(args.signposts) if n.startswith("nuq") and n[3:].isdigit()),
                  reverse=True)
    if not bits:
        raise SystemExit(f"{args.signposts} holds no nuqX folders; run calibrate.py --output-dir {args.signposts}")
    summary: dict = {}

    _section(f"Perplexity, first {args.windows} windows of {args.seqlen} tokens ({os.path.basename(args.text_file)})")
    methods = ["fp16"] + [f"nuq{b}" for b in bits] + ["int4", "kivi4"]
    t0 = time.time()
    res = evaluate_perplexity(model, tok, methods, text_file=args.text_file, seqlen=args.seqlen,
                              windows=args.windows, signposts=args.signposts)
    base = res["fp16"]["ppl"]
    print(f"{'method':<10}{'PPL':>9}{'vs fp16':>10}{'bits/elem':>11}")
    for m in methods:
        r = res[m]
        print(f"{m:<10}{r['ppl']:>9.3f}{100 * (r['ppl'] / base - 1):>+9.2f}%{r['avg_bits']:>11.2f}")
    print(f"({time.time() - t0:.0f} s; nuqX = calibrated signposts with 1% outliers, simulated quantization;\n"
          f" bits/elem = stored bits per K/V element in the cache of an fp16/bf16 model at {args.seqlen} tokens, "
          "the exact sink and 128-token recent window included)")
    note = _calibration_note(args.signposts, max(bits), args.model)
    if note:
        print(note)
    summary["perplexity"] = {m: res[m]["ppl"] for m in methods}

    _section(f"Greedy generation: fp cache vs KVQuant nuq{max(bits)} (real packed cache)")
    ids = tok(args.prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True,
                             cache_implementation="kvquant",
                             cache_config={"signposts": args.signposts, "bits": max(bits)})
    n = ids.shape[1]
    ref_text = tok.decode(ref[0, n:], skip_special_tokens=True)
    kvq_text = tok.decode(out.sequences[0, n:], skip_special_tokens=True)
    same = int((ref[0, n:] == out.sequences[0, n : ref.shape[1]]).sum()) if out.sequences.shape == ref.shape else 0
    print(f"prompt : {args.prompt!r}")
    print(f"fp     : {ref_text!r}")
    print(f"nuq{max(bits)}   : {kvq_text!r}")
    print(f"same tokens: {same}/{ref.shape[1] - n} (greedy text diverges after the first near-tied token; "
          "perplexity above is the measure of quality)")

    _section("Memory of the KVQuant cache after that generation")
    # the cache generate used: `out.cache` from transformers 5.24.0, `out.past_key_values` up to 5.23
    cache = out.cache if "cache" in out else out.past_key_values
    stats = cache.memory_stats()
    layer = next(layer for layer in cache.layers if layer.is_initialized)
    slot_bytes = torch.empty((), dtype=layer.dtype).element_size()
    fp16_model_bits = nuq_avg_bits(max(bits), layer.head_dim, stats["outlier_slots"])
    print(f"tokens held      : {stats['seq_length']} x {stats['layers']} layers "
          f"({stats['sink_tokens']} exact sink token(s), {stats['quantized_tokens']} packed, the last "
          f"{stats['window_tokens']} of them also exact in the recent window)")
    ratio = stats["compression_ratio"]
    size = f"{ratio:.2f}x smaller" if ratio >= 1 else (
        f"{1 / ratio:.2f}x larger: at so few tokens the exact recent window dominates")
    print(f"stored bytes     : {stats['bytes']:,} (fp16 cache of the same tokens: {stats['fp16_bytes']:,}; {size})")
    print(f"bits per element : {stats['avg_bits_per_element']:.3f} = {max(bits)}-bit codes + the values' per-token "
          f"scale/zero + {stats['outlier_slots']} outlier slot(s) per token and head,\n"
          f"                   a slot being a {slot_bytes}-byte value in this model's dtype "
          f"({str(layer.dtype).replace('torch.', '')}) + a 1-byte channel")
    print(f"                   {fp16_model_bits:.3f} = the same for an fp16/bf16 model (2-byte slot values); the "
          f"table's {res[f'nuq{max(bits)}']['avg_bits']:.2f}\n"
          f"                   adds the exact sink's and recent window's share of a {args.seqlen}-token window")
    print(f"                   {stats['avg_bits_per_element_all']:.3f} = every stored byte over every held element, "
          f"the exact sink, the recent window and int32 positions included")
    summary["memory"] = {k: stats[k] for k in ("bytes", "fp16_bytes", "compression_ratio", "avg_bits_per_element")}
    return summary


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        main()
