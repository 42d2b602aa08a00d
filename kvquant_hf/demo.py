"""Show what calibrated KVQuant signposts do on a model: perplexity, generated text, memory.

Runs after ``calibrate.py`` (the README's first command runs both)::

    python -m kvquant_hf.demo --model smollm2 --signposts signposts/smollm2 \
        --text-file ../shared/data/wikitext-2/test.raw.txt

1. WikiText-2 perplexity on the first ``--windows`` windows: fp16 vs nuq4/nuq3/nuq2 (simulated
   quantization, which equals token-by-token decoding through the real cache) and int4/KIVI-4 for scale.
2. Greedy text for one prompt with the fp cache and with ``cache_implementation="kvquant"`` side by side.
3. The real cache's memory after that generation: bytes, bits per element, compression vs fp16.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--signposts", required=True, help="folder written by calibrate.py (holding nuq4/, nuq3/, ...)")
    ap.add_argument("--text-file", required=True, help="evaluation text (WikiText-2 test.raw.txt)")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--prompt", default="The history of the Roman Empire")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    import kvquant_hf  # noqa: F401  (registers cache_implementation="kvquant")
    from kvquant_hf.evaluation.perplexity import evaluate_perplexity
    from kvquant_hf.models.loading import load_model_and_tokenizer

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
    print(f"({time.time() - t0:.0f} s; nuqX = calibrated signposts with 1% outliers, simulated)")
    summary["perplexity"] = {m: res[m]["ppl"] for m in methods}

    _section("Greedy generation: fp cache vs KVQuant nuq4 (real packed cache)")
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
    print(f"same tokens: {same}/{ref.shape[1] - n}")

    _section("Memory of the KVQuant cache after that generation")
    cache = getattr(out, "cache", None) or out.past_key_values  # transformers >= 5.2x names it `cache`
    stats = cache.memory_stats()
    print(f"tokens held      : {stats['seq_length']} x {stats['layers']} layers")
    print(f"stored bytes     : {stats['bytes']:,} (fp16 cache: {stats['fp16_bytes']:,}; "
          f"{stats['compression_ratio']:.2f}x smaller)")
    print(f"bits per element : {stats['avg_bits_per_element']:.3f} (codes, scales, outliers); "
          f"{stats['avg_bits_per_element_all']:.3f} with sink tokens and positions")
    summary["memory"] = {k: stats[k] for k in ("bytes", "fp16_bytes", "compression_ratio", "avg_bits_per_element")}
    return summary


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        main()
