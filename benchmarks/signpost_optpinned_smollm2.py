"""Signposts with Fisher-optimized key thresholds and pinned k-means key tables fitted for them (session 6 probe).

Key thresholds come from ``--thresholds`` (default ``smollm2-1pct-optu``, made by
``benchmarks/signpost_variants_smollm2.py --key-thresholds fisher-opt``). The key table is recomputed in the
normalized space those thresholds define, exactly as ``signposts_from_sample(..., key_table="kmeans-pinned")``
does for the percentile thresholds: in-range elements only, per-element Fisher weights, the same subsample
(``kmeans_subsample``, seed ``seed + 2 * layer``) and ``weighted_kmeans_1d_pinned``. Values (tables and Q-Norm
statistics) are copied unchanged from ``--base`` (the reference ``smollm2-1pct``).

The ``--sample`` is the captured calibration sample of ``benchmarks/signpost_variants_smollm2.py --capture PATH``
(the reference windows with per-element Fisher weights). Result on the H200 passkey grid: 13/15 cells within one
trial of fp16 at nuq3 (``passkey_smollm2_nuq3_variants.md``), not a default.

Usage::

    python benchmarks/signpost_optpinned_smollm2.py --sample /work/runs/diag/calib_sample_fisher.pt \\
        --bits 3 --output /work/signposts/smollm2-1pct-s6-optpinned
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch


def make(args) -> None:
    from kvquant_hf.calibration import (
        DEFAULT_KMEANS_MAX_POINTS,
        _prepare,
        normalize_keys,
        qnorm_stats,
        weighted_kmeans_1d_pinned,
    )
    from kvquant_hf.signposts import LayerSignposts, Signposts, load_signposts, save_signposts

    t0 = time.time()
    sample = torch.load(args.sample, weights_only=False)
    h, d = sample.num_kv_heads, sample.head_dim
    print(f"sample loaded ({time.time() - t0:.0f} s)", flush=True)
    for bits in args.bits:
        base = load_signposts(args.base, bits=bits)
        thr = load_signposts(args.thresholds, bits=bits)
        if base.metadata.get("fisher_weighting") != "fisher":
            raise SystemExit("base is not per-element Fisher weighted; this tool reproduces that recipe only")
        layers = []
        for i, (bl, tl) in enumerate(zip(base.layers, thr.layers)):
            k = sample.keys[i].view(-1, h, d)
            kw = sample.key_fisher[i].view(-1, h, d)
            lower, upper = tl.key_lower.float(), tl.key_upper.float()
            kx, kin, _ = normalize_keys(k, lower, upper)
            kstats = _prepare(kx, kin, kw, DEFAULT_KMEANS_MAX_POINTS, args.seed + 2 * i)
            ksp = weighted_kmeans_1d_pinned(kstats.points, kstats.weights, 2**bits)
            layers.append(LayerSignposts(ksp, bl.value_signposts.float(), lower.contiguous(), upper.contiguous(),
                                         qnorm_stats(kstats.x_in, ksp), bl.value_qnorm.float()))
            print(f"nuq{bits} layer {i}: in-range {float(kin.float().mean()):.4f}, table "
                  f"{[round(float(x), 3) for x in ksp]} ({time.time() - t0:.0f} s)", flush=True)
        meta = json.loads(json.dumps(base.metadata))
        meta.pop("files", None)
        meta.pop("variant", None)
        meta["calibration"]["key_table"] = "kmeans-pinned"
        meta["variant"] = {
            "tool": "benchmarks/signpost_optpinned_smollm2.py (session 6 probe)",
            "key_thresholds": f"from {os.path.abspath(args.thresholds)} (fisher-opt)",
            "key_table": "kmeans-pinned, fitted in the space of those thresholds",
            "values": f"copied from {os.path.abspath(args.base)}", "sample": args.sample,
            "tuning_s": round(time.time() - t0, 1), "created": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        save_signposts(Signposts(layers, meta), args.output)
        print(f"wrote {args.output}/nuq{bits}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sample", required=True, help="captured calibration sample (.pt), the reference windows")
    p.add_argument("--base", default="/work/signposts/smollm2-1pct", help="reference signposts (values, metadata)")
    p.add_argument("--thresholds", default="/work/signposts/smollm2-1pct-optu", help="signposts with the key thresholds")
    p.add_argument("--bits", nargs="+", type=int, default=[3])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    make(args)


if __name__ == "__main__":
    main()
