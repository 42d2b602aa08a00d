"""Real KVQuantCache on SmolLM2 (CPU): real vs simulated perplexity, stored bits, greedy agreement.

Three measurements for the "KVQuantCache" issue:

1. Perplexity through the real cache (``--prefill 0``: every scored token attends to packed history as
   in generation) next to the simulated quantization, first 4 windows of 2048 tokens of the WikiText-2
   test text, nuq4/3/2 with 1% outliers; uncalibrated nuq4 for contrast.
2. Average stored bits per K/V element from ``cache.memory_stats()`` (``get_memory_footprint``) for
   SmolLM2 (head_dim 64) and a head_dim-128 Llama shape.
3. Teacher-forced greedy agreement: 8 prompts of 512 tokens, 64 greedy tokens from the fp model; the
   fraction of steps where the quantized cache picks the same next token when fed the same prefix.

Usage: ``python benchmarks/cache_accuracy_smollm2.py --signposts /work/signposts/smollm2-1pct``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import md_table, write_results

TEST_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "test.raw.txt")


def teacher_forced_agreement(model, ids: torch.Tensor, cache_factory, prompt_len=512, new_tokens=64, prompts=8):
    """Fraction of greedy steps where a cache picks the fp model's next token, fed the fp continuation.

    All prompts run as one batch (same length, no padding).
    """
    from transformers import DynamicCache

    n = ids.numel()
    stride = (n - prompt_len - new_tokens) // prompts
    dev = next(model.parameters()).device
    batch = torch.stack([ids[p * stride : p * stride + prompt_len] for p in range(prompts)]).to(dev)
    with torch.inference_mode():
        ref = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, past_key_values=DynamicCache())
        cont = ref[:, prompt_len:]
        cache = cache_factory()
        logits = model(batch, past_key_values=cache).logits[:, -1]
        hits = torch.zeros(prompts, device=dev)
        for t in range(new_tokens):
            hits += (logits.argmax(-1) == cont[:, t]).float()
            if t + 1 < new_tokens:
                pos = torch.full((prompts, 1), prompt_len + t, device=dev)
                logits = model(cont[:, t : t + 1], past_key_values=cache, position_ids=pos).logits[:, -1]
    per_prompt = (hits / new_tokens).cpu().tolist()
    return float(hits.sum().cpu() / (prompts * new_tokens)), per_prompt


def _dump_partial(record: dict) -> None:
    """Append one finished measurement to ``cache_accuracy_smollm2_partial.jsonl`` (long CPU runs)."""
    from common import results_dir

    with open(os.path.join(results_dir(), "cache_accuracy_smollm2_partial.jsonl"), "a") as fh:
        fh.write(json.dumps(record, default=float) + "\n")


def real_cache_ppl(model, windows: torch.Tensor, cache_factory, prefill: int = 0) -> float:
    """PPL of ``windows [N, L]`` through a real cache (all windows as one batch): the first ``prefill`` tokens in
    one call (a prompt: exact among themselves), then token by token (each attends to packed history)."""
    n, length = windows.shape
    cache = cache_factory()
    nll = torch.zeros((), dtype=torch.float64, device=windows.device)
    with torch.inference_mode():
        if prefill > 1:
            logits = model(windows[:, :prefill], past_key_values=cache).logits[:, :-1]
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     windows[:, 1:prefill].reshape(-1), reduction="sum").double()
        for t in range(max(prefill - 1, 0), length - 1):
            pos = torch.full((n, 1), t, device=windows.device)
            logits = model(windows[:, t : t + 1], past_key_values=cache, position_ids=pos).logits[:, -1]
            nll += torch.nn.functional.cross_entropy(logits.float(), windows[:, t + 1], reduction="sum").double()
    return float(torch.exp(nll / (n * (length - 1))))


def bits_for_shape(head_dim: int, bits: int, tokens: int = 600, dtype: torch.dtype = torch.float32,
                   kv_heads: int = 1) -> dict:
    """memory_stats() of a KVQuantCache holding ``tokens`` tokens of a tiny random model of this head_dim and dtype
    (outlier values are stored in the model dtype, so fp32 models pay 40 bits per slot, fp16/bf16 24)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import kvquant_hf

    cfg = LlamaConfig(vocab_size=256, hidden_size=2 * kv_heads * head_dim, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2 * kv_heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    kvquant_hf.patch_model(model)
    cache = kvquant_hf.KVQuantCache({"bits": bits, "outlier_fraction": 0.01}, model_config=cfg)
    with torch.inference_mode(), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        model(torch.randint(0, 256, (1, tokens)), past_key_values=cache)
    return cache.memory_stats()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--signposts", required=True, help="folder with nuq4/nuq3/nuq2 (1%% outliers)")
    ap.add_argument("--text-file", default=TEST_TEXT)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--seqlen", type=int, default=2048, help="window length of the perplexity comparison")
    ap.add_argument("--agreement-bits", type=int, nargs="*", default=[4, 3, 2])
    ap.add_argument("--skip-uncalibrated", action="store_true")
    ap.add_argument("--skip-bits", action="store_true")
    ap.add_argument("--agreement-uncalibrated", action="store_true", help="also nuq4 without signposts")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the real cache uses the Triton kernels)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--name", default="cache_accuracy_smollm2", help="results file name")
    args = ap.parse_args(argv)

    import kvquant_hf
    from kvquant_hf.evaluation.perplexity import evaluate_perplexity
    from kvquant_hf.models.loading import load_model_and_tokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = load_model_and_tokenizer("smollm2", dtype=args.dtype, device=args.device)
    kvquant_hf.patch_model(model)  # KVQuantCache attends itself (generate would patch too; direct calls need it)
    with open(args.text_file, encoding="utf-8") as fh:
        text = fh.read()
    ids = tok(text, return_tensors="pt").input_ids[0]
    out = {"ppl": [], "bits": [], "agreement": []}

    if not args.skip_ppl:
        methods = ["fp16"] + [f"nuq{b}" for b in args.bits]
        t0 = time.time()
        sim = evaluate_perplexity(model, ids, methods, seqlen=args.seqlen, windows=args.windows,
                                  signposts=args.signposts)
        out["ppl_seconds"] = {"simulated": time.time() - t0}
        wins = ids[: args.windows * args.seqlen].reshape(args.windows, args.seqlen).to(args.device)
        real = {}
        for b in args.bits:
            t0 = time.time()
            sp = os.path.join(args.signposts, f"nuq{b}")
            real[f"nuq{b}"] = real_cache_ppl(
                model, wins, lambda b=b, sp=sp: kvquant_hf.KVQuantCache({"bits": b, "signposts": sp}, model_config=model.config))
            out["ppl_seconds"][f"real_nuq{b}"] = time.time() - t0
            print("real", b, real[f"nuq{b}"], flush=True)
            _dump_partial({"simulated": {m: sim[m]["ppl"] for m in methods}, "real": real,
                           "seconds": out["ppl_seconds"], "windows": args.windows, "seqlen": args.seqlen})
        sp4 = os.path.join(args.signposts, "nuq4")
        for m in methods:
            row = {"method": m + ("-1%" if m != "fp16" else ""), "simulated_ppl": sim[m]["ppl"]}
            if m in real:
                row["real_ppl"] = real[m]
                row["real_vs_sim_%"] = 100 * (real[m] / sim[m]["ppl"] - 1)
                row["vs_fp16_%"] = 100 * (real[m] / sim["fp16"]["ppl"] - 1)
            out["ppl"].append(row)
    if not args.skip_ppl and not args.skip_uncalibrated:
        cal512 = real_cache_ppl(model, wins, lambda: kvquant_hf.KVQuantCache(
            {"bits": 4, "signposts": sp4}, model_config=model.config), prefill=512)
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            unc = real_cache_ppl(model, wins, lambda: kvquant_hf.KVQuantCache({"bits": 4}, model_config=model.config),
                                 prefill=512)
        out["ppl"].append({"method": "nuq4-1% calibrated, prefill 512 then decode", "real_ppl": cal512,
                           "vs_fp16_%": 100 * (cal512 / sim["fp16"]["ppl"] - 1)})
        out["ppl"].append({"method": "nuq4 uncalibrated (NF table, key ranges from the 512-token prompt), prefill 512",
                           "real_ppl": unc, "vs_fp16_%": 100 * (unc / sim["fp16"]["ppl"] - 1)})

    for head_dim in (64, 128) if not args.skip_bits else ():
        for bits in (4, 3, 2):
            s = bits_for_shape(head_dim, bits)
            out["bits"].append({"head_dim": head_dim, "method": f"nuq{bits}-1%", "outlier_slots": s["outlier_slots"],
                                "key_bits": s["key_bits_per_element"], "value_bits": s["value_bits_per_element"],
                                "avg_bits": s["avg_bits_per_element"], "avg_bits_all_bytes": s["avg_bits_per_element_all"],
                                "compression_vs_fp16": s["compression_ratio"]})

    for bits in args.agreement_bits:
        sp = os.path.join(args.signposts, f"nuq{bits}")
        rate, per = teacher_forced_agreement(
            model, ids, lambda bits=bits, sp=sp: kvquant_hf.KVQuantCache({"bits": bits, "signposts": sp},
                                                                     model_config=model.config))
        out["agreement"].append({"method": f"nuq{bits}-1%", "agreement": rate, "min_prompt": min(per)})
        print(out["agreement"][-1], flush=True)
        _dump_partial({"agreement": out["agreement"]})
    if args.agreement_uncalibrated:
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            rate, per = teacher_forced_agreement(
                model, ids, lambda: kvquant_hf.KVQuantCache({"bits": 4}, model_config=model.config))
        out["agreement"].append({"method": "nuq4 uncalibrated (key ranges from the prompt)", "agreement": rate,
                                 "min_prompt": min(per)})
        print(out["agreement"][-1], flush=True)

    where = f"{args.device}, {args.dtype}" + (f", {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else "")
    md = [f"# KVQuantCache on SmolLM2-135M-Instruct ({where})", ""]
    if out["ppl"]:
        md += [f"## Real cache vs simulated quantization (WikiText-2 test, first {args.windows} windows of {args.seqlen})",
               "", md_table(out["ppl"], ["method", "simulated_ppl", "real_ppl", "real_vs_sim_%", "vs_fp16_%"]), ""]
    md += ["## Stored bits per K/V element (`cache.memory_stats()`, from `get_memory_footprint()`)", "",
           "`avg_bits` counts codes, per-token value scale/zero and outlier slots per quantized element; "
           "`avg_bits_all_bytes` divides every stored byte (sink tokens and int32 positions included) by the "
           "elements held (600 tokens, 1 sink token).", "",
           md_table(out["bits"], ["head_dim", "method", "outlier_slots", "key_bits", "value_bits", "avg_bits",
                                  "avg_bits_all_bytes", "compression_vs_fp16"]), "",
           "## Teacher-forced greedy agreement with the fp model (8 prompts x 512 tokens, 64 new tokens)", "",
           md_table(out["agreement"], ["method", "agreement", "min_prompt"])]
    print(write_results(args.name, out["ppl"] + out["bits"] + out["agreement"], "\n".join(md),
                        meta={"signposts": args.signposts, "device": args.device, "dtype": args.dtype,
                              "command": " ".join(["python", *sys.argv])}))
    print(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
