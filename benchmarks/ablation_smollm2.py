"""Ablation of KVQuant's ideas on SmolLM2-135M-Instruct (WikiText-2 test, first windows of 2048 tokens).

Two anchors, each row changing one thing:

* the **reference calibration** (what ``calibrate.py`` writes: pre-RoPE per-channel keys with thresholds at the
  0.5/99.5th percentiles, Fisher-weighted k-means nuq tables, one outlier slot per token and head, 1 sink
  token, no Q-Norm) with each of the five ideas removed or varied: keys per token, keys after RoPE, uniform
  instead of nuq tables, Fisher vs none vs F * s^2 table weighting, 0% / 1% / more outlier slots, sink 0/1/4,
  Q-Norm;
* the **tuned calibration** (``signpost_variants_smollm2.py``: Fisher-optimized per-channel key thresholds,
  uniform or channel-Fisher k-means tables) with its options (tables, slots, Q-Norm, sink).

Only rows marked "storable" can be stored by ``KVQuantCache`` (the others are simulation-only probes).
intX / KIVI-X rows come from the first windows of the accuracy run (``accuracy_smollm2.py``, group
``baselines``) when present.

Usage::

    python benchmarks/ablation_smollm2.py --windows 8 --bits 4 3 2 [--variants ...]
    python benchmarks/ablation_smollm2.py --render-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch

from kvquant_hf import quant
from kvquant_hf.simulated import MethodSpec, NuqLayerParams

TEST_TEXT = os.path.normpath(os.path.join(_ROOT, "..", "shared", "data", "wikitext-2", "test.raw.txt"))
VALID_TEXT = os.path.normpath(os.path.join(_ROOT, "..", "shared", "data", "wikitext-2", "valid.tokens.txt"))
SIGNPOSTS = "/work/signposts"
RESULTS = os.path.join(_ROOT, "benchmarks", "results")

#: variant -> (description, settings that differ from BASE). Two anchors: the reference calibration (as
#: calibrate.py writes it) and the tuned calibration of ``signpost_variants_smollm2.py``.
VARIANTS: dict[str, tuple[str, dict]] = {
    # --- reference calibration (1% percentile thresholds, Fisher-weighted k-means tables) and one idea varied
    "full": ("reference calibration, 1 slot (nuqX-1% as calibrate.py writes it)", {}),
    "keys-per-token": ("keys per token (online range), pre-RoPE", {"key_granularity": "token"}),
    "keys-post-rope": ("keys per channel after RoPE (post-RoPE 1% thresholds)", {"key_rope": "post"}),
    "uniform": ("uniform signposts (int grid) in the same ranges", {"lut": "uniform"}),
    "pinned-keys": ("key tables with their extreme levels moved to -1/+1 (clipped keys land there)",
                    {"lut": "pinned-keys"}),
    "pinned": ("key and value tables with their extreme levels moved to -1/+1", {"lut": "pinned"}),
    "no-fisher": ("tables: k-means without Fisher weights", {"signposts": "smollm2-1pct-nofisher"}),
    "kmeans-pinned-keys": ("key tables: Fisher-weighted k-means with the outer entries pinned at -1/+1 "
                           "(calibrate.py --key-table kmeans-pinned)",
                           {"signposts": "smollm2-1pct-pinned"}),
    "fisher-x2": ("tables: k-means weighted by F * s^2", {"signposts": "smollm2-1pct-fx2"}),
    "outliers-0": ("0% outliers (min/max key thresholds, no slots)", {"signposts": "smollm2-0pct", "slots": 0}),
    "slots-2": ("2 outlier slots per token (1% thresholds)", {"slots": 2}),
    "slots-4": ("4 outlier slots per token (1% thresholds)", {"slots": 4}),
    "sink-0": ("no attention sink", {"sink": 0}),
    "sink-4": ("4 sink tokens", {"sink": 4}),
    "qnorm": ("Q-Norm on", {"qnorm": True}),
    "keys-only": ("only keys quantized (values exact): the keys' share of the loss", {"quantize": "keys"}),
    "values-only": ("only values quantized (keys exact): the values' share of the loss", {"quantize": "values"}),
    # --- tuned calibration (Fisher-optimized per-channel key thresholds) and its options
    "opt-uniform": ("tuned: Fisher-opt key thresholds, uniform tables, 1 slot", {"signposts": "smollm2-1pct-optu"}),
    "opt-uniform-slots-2": ("tuned: Fisher-opt key thresholds, uniform tables, 2 slots",
                            {"signposts": "smollm2-1pct-optu", "slots": 2}),
    "opt-uniform-slots-2-keys-only": ("tuned, 2 slots, only keys quantized",
                                      {"signposts": "smollm2-1pct-optu", "slots": 2, "quantize": "keys"}),
    "opt-uniform-slots-2-values-only": ("tuned, 2 slots, only values quantized",
                                        {"signposts": "smollm2-1pct-optu", "slots": 2, "quantize": "values"}),
    "opt-kmeans": ("tuned: Fisher-opt key thresholds, k-means (F_channel * s^2) tables, 1 slot",
                   {"signposts": "smollm2-1pct-optkm"}),
    "opt-kmeans-slots-2": ("tuned: Fisher-opt key thresholds, k-means (F_channel * s^2) tables, 2 slots",
                           {"signposts": "smollm2-1pct-optkm", "slots": 2}),
    "opt-kmeans-qnorm": ("tuned: Fisher-opt key thresholds, k-means tables, 1 slot, Q-Norm",
                         {"signposts": "smollm2-1pct-optkm", "qnorm": True}),
    "opt-kmeans-sink-4": ("tuned: Fisher-opt key thresholds, k-means tables, 1 slot, 4 sink tokens",
                          {"signposts": "smollm2-1pct-optkm", "sink": 4}),
}
BASE = {"signposts": "smollm2-1pct", "slots": 1, "sink": 1, "qnorm": False, "lut": "signposts", "quantize": "both",
        "key_granularity": "channel", "key_rope": "pre"}


def variant_config(variant: str, extra: dict | None = None) -> dict:
    cfg = dict(BASE)
    cfg.update(VARIANTS[variant][1] if variant in VARIANTS else {})
    cfg.update(extra or {})
    return cfg


def post_rope_thresholds(model, tok, path: str, nwindows: int = 4, seqlen: int = 2048,
                         fraction: float = 0.01) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(lower, upper) [H, D]`` of *post-RoPE* keys at the f/2, 1-f/2 quantiles on the validation text.

    Captured through the patched model with an fp16 simulated cache (its history holds the exact rotated keys);
    first token of every window excluded (sink). Cached in ``path``.
    """
    if os.path.isfile(path):
        return torch.load(path)
    from kvquant_hf.evaluation.perplexity import load_token_ids
    from kvquant_hf.simulated import build_simulated_cache

    ids = load_token_ids(tok, text_file=os.environ.get("KVQUANT_VALID_TEXT", VALID_TEXT))
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, ids.numel() - seqlen, (nwindows,), generator=g).tolist()
    keys: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_hidden_layers)]
    with torch.no_grad():
        for s in starts:
            cache = build_simulated_cache(model, "fp16")
            model(ids[s : s + seqlen][None].to(next(model.parameters()).device), cache=cache)
            for i, layer in enumerate(cache.layers):
                keys[i].append(layer.keys[:, :, 1:].clone())
    out = [quant.key_thresholds_from_sample(torch.cat(k, 2), fraction) for k in keys]
    torch.save(out, path)
    return out


def build_methods(bits_list, variants, signposts_root, model, tok, work_dir):
    """MethodSpecs, signposts dict and nuq_params dict for evaluate_perplexity (skips missing signposts)."""
    from kvquant_hf.signposts import load_signposts
    from kvquant_hf.simulated import nuq_params_from_signposts

    methods, sps, params, skipped, configs = [], {}, {}, [], {}
    post = None
    for bits in bits_list:
        for variant in variants:
            cfg = variant_config(variant)
            name = f"nuq{bits}:{variant}"
            folder = os.path.join(signposts_root, cfg["signposts"])
            if not os.path.isdir(os.path.join(folder, f"nuq{bits}")):
                skipped.append(name)
                continue
            spec = MethodSpec("nuq", bits, outlier_slots=cfg["slots"], sink_tokens=cfg["sink"], qnorm=cfg["qnorm"],
                              key_granularity=cfg["key_granularity"], key_rope=cfg["key_rope"], quantize=cfg["quantize"],
                              name=name)
            methods.append(spec)
            configs[name] = cfg
            if cfg["lut"] == "signposts" and cfg["key_rope"] == "pre":
                sps[name] = folder
                continue
            layer_params = nuq_params_from_signposts(load_signposts(folder, bits=bits), qnorm=cfg["qnorm"])
            if cfg["lut"] == "uniform":
                uni = quant.uniform_signposts(bits)
                layer_params = [NuqLayerParams(uni.clone(), uni.clone(), p.key_lower, p.key_upper)
                                for p in layer_params]
            elif cfg["lut"] in ("pinned-keys", "pinned"):  # extreme levels moved to -1/+1 (where clipping lands)
                def pin(t):
                    t = t.clone()
                    t[0], t[-1] = -1.0, 1.0
                    return t
                layer_params = [NuqLayerParams(pin(p.key_lut), pin(p.value_lut) if cfg["lut"] == "pinned" else
                                               p.value_lut, p.key_lower, p.key_upper) for p in layer_params]
            if cfg["key_rope"] == "post":
                if post is None:
                    post = post_rope_thresholds(model, tok, os.path.join(work_dir, "post_rope_thresholds_1pct.pt"))
                layer_params = [NuqLayerParams(p.key_lut, p.value_lut, lo, hi)
                                for p, (lo, hi) in zip(layer_params, post)]
            params[name] = layer_params
    return methods, sps, params, skipped, configs


def first_windows_ppl(result: dict, n: int) -> float | None:
    w = result.get("window_nll", [])
    if len(w) < n:
        return None
    return math.exp(sum(w[:n]) / (n * result.get("tokens_per_window", result["seqlen"] - 1)))


def render(args) -> None:
    path = os.path.join(args.work_dir, "ablation.json")
    with open(path) as f:
        data = json.load(f)
    res, meta = data["results"], data["meta"]
    n = args.windows
    base_path = os.path.join(args.accuracy_dir, "baselines.json")
    baselines = {}
    if os.path.isfile(base_path):
        with open(base_path) as f:
            baselines = json.load(f)["results"]
    fp16 = res.get("fp16") or baselines.get("fp16")
    fp16_ppl = first_windows_ppl(fp16, n) if fp16 else None
    fp16_line = f"fp16 PPL on these windows: {fp16_ppl:.3f}." if fp16_ppl else "(fp16 not available yet.)"
    lines = [
        "# Ablation: KVQuant on SmolLM2-135M-Instruct",
        "",
        f"WikiText-2 test text (`test.raw.txt`), first {n} non-overlapping windows of {args.seqlen} tokens, "
        f"simulated quantization (decode-equivalent), {meta.get('device', 'cpu')} float32. {fp16_line}",
        "Each row changes one thing from the full method nuqX-1% (pre-RoPE per-channel keys with calibrated "
        "thresholds, Fisher-weighted nuq signposts, 1 outlier slot per token and head (= 1% of head_dim 64), "
        "1 sink token, no Q-Norm). 'storable' = KVQuantCache can store exactly this setting.",
        "",
    ]
    bits_list = sorted({int(k.split(":")[0][3:]) for k in res if k.startswith("nuq")}, reverse=True)
    for bits in bits_list:
        lines += [f"## {bits} bits", "", "| variant | PPL | delta vs fp16 | avg bits | storable |",
                  "| --- | ---: | ---: | ---: | --- |"]
        rows = []
        for name, r in res.items():
            if not name.startswith(f"nuq{bits}:"):
                continue
            variant = name.split(":", 1)[1]
            p = first_windows_ppl(r, n)
            desc = VARIANTS.get(variant, (variant, {}))[0]
            if p is None:  # an unfinished run: compare on the windows it has (fp16 on the same windows)
                m = len(r.get("window_nll") or [])
                if m == 0 or not fp16:
                    continue
                p = first_windows_ppl(r, m) * fp16_ppl / first_windows_ppl(fp16, m)  # same delta vs fp16
                desc += f" (first {m} windows, delta on those; PPL rescaled)"
            storable = "yes" if (r["spec"]["key_granularity"] == "channel" and r["spec"]["key_rope"] == "pre"
                                 and r["spec"].get("quantize", "both") == "both") else "no"
            rows.append((desc, p, r["avg_bits"], storable))
        for b in (f"int{bits}", f"kivi{bits}"):
            if b in baselines and first_windows_ppl(baselines[b], n):
                rows.append((f"baseline {b}", first_windows_ppl(baselines[b], n), baselines[b]["avg_bits"], "-"))
        for desc, p, avg, storable in rows:
            delta = f"{100 * (p / fp16_ppl - 1):+.2f}%" if fp16_ppl else ""
            lines.append(f"| {desc} | {p:.3f} | {delta} | {avg:.3f} | {storable} |")
        lines.append("")
    lines += ["## How this was made", "", f"- `{meta.get('command')}`", f"- {meta.get('date')}, {meta.get('machine')}",
              "- post-RoPE key thresholds: 1% quantiles of the rotated keys of 4 random validation windows "
              "(seed 0); the nuq tables stay those calibrated on pre-RoPE keys.",
              f"- rendered {datetime.datetime.now().isoformat(timespec='seconds')}: "
              "`python benchmarks/ablation_smollm2.py --render-only`"]
    if meta.get("skipped"):
        lines.append(f"- skipped (signposts missing at run time): {', '.join(meta['skipped'])}")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--text-file", default=TEST_TEXT)
    p.add_argument("--signposts-root", default=SIGNPOSTS)
    p.add_argument("--work-dir", default="/work/runs/ablation_smollm2")
    p.add_argument("--accuracy-dir", default="/work/runs/accuracy_smollm2", help="baselines.json for int/KIVI rows")
    p.add_argument("--with-fp16", action="store_true", help="also run fp16 here (else taken from the accuracy run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the simulated caches run on the model's device)")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--name", default="ablation_smollm2",
                   help="result file benchmarks/results/NAME.md (use another name for side experiments)")
    args = p.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    if not args.render_only:
        from kvquant_hf.evaluation import evaluate_perplexity
        from kvquant_hf.evaluation.perplexity import load_token_ids, run_info, tune_cpu_allocator
        from kvquant_hf.models import patch_model
        from kvquant_hf.models.loading import load_model_and_tokenizer

        torch.set_num_threads(args.threads)
        tune_cpu_allocator()
        model, tok = load_model_and_tokenizer("smollm2", device=args.device)
        patch_model(model)
        ids = load_token_ids(tok, text_file=args.text_file)
        methods, sps, params, skipped, _ = build_methods(args.bits, args.variants, args.signposts_root, model, tok,
                                                          args.work_dir)
        if args.with_fp16:
            methods.insert(0, "fp16")
        path = os.path.join(args.work_dir, "ablation.json")
        state = None
        if os.path.isfile(path):
            with open(path) as f:
                state = json.load(f)["results"]
        meta = {**run_info(), "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "skipped": skipped,
                "windows": args.windows, "machine": f"{platform.node()} {os.cpu_count()} CPUs"
                + (f", {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else ""),
                "device": args.device}
        t0 = time.time()

        def checkpoint(res):
            merged = dict(state or {})
            merged.update(res)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"meta": meta, "results": merged}, f, indent=1)
            os.replace(tmp, path)

        res = evaluate_perplexity(model, ids, methods, seqlen=args.seqlen, windows=args.windows,
                                  signposts=sps or None, nuq_params=params, state=state,
                                  progress=lambda line: print(f"[{time.time() - t0:7.0f}s] {line}", flush=True),
                                  on_window=checkpoint)
        checkpoint(res)
    render(args)


if __name__ == "__main__":
    main()
