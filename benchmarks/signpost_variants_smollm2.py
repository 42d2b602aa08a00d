"""Calibration variants for the SmolLM2 accuracy study: Fisher-optimized key thresholds and alternative tables.

The reference calibration (``calibrate.py``) sets per-channel key thresholds at fixed percentiles and fits the
nuq tables by k-means weighted with the per-element Fisher information. On SmolLM2 (head_dim 64) the key
error is dominated by a few channel pairs per head (large query weight, wide range), and per-element Fisher
weights are too noisy to place 16 levels well. This tool writes *storable* variants (ordinary signpost folders
that ``KVQuantCache`` and the simulated caches load) from one captured calibration sample:

* ``--key-thresholds fisher-opt``: per (layer, kv head, channel), the lower/upper thresholds are chosen among
  quantile levels of the calibration keys by coordinate descent on the channel-mean-Fisher-weighted squared
  error of the *whole* quantizer, including the per-token outlier slot (the channel with the largest
  normalized excess of a token gets the slot; the rest are clipped). Important channels get tight ranges,
  unimportant ones wide ranges that leave the slot to the others.
* ``--key-lut`` / ``--value-lut``: ``base`` (keep the reference table), ``uniform`` (intX grid on [-1, 1]),
  ``kmeans-fc`` (k-means weighted by channel-mean Fisher x scale^2, i.e. the error in the original space with
  per-channel rather than per-element Fisher).

Usage::

    python benchmarks/signpost_variants_smollm2.py --capture /work/runs/calib_sample_fisher.pt   # once (~20 min CPU)
    python benchmarks/signpost_variants_smollm2.py --sample /work/runs/calib_sample_fisher.pt --bits 4 3 2 \\
        --key-thresholds fisher-opt --key-lut uniform --value-lut uniform --output /work/signposts/smollm2-1pct-opt
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

from kvquant_hf import quant

VALID_TEXT = os.path.normpath(os.path.join(_ROOT, "..", "shared", "data", "wikitext-2", "valid.tokens.txt"))
#: symmetric outlier fractions tried per channel (thresholds at the f/2 and 1 - f/2 quantiles)
FRACTIONS = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15)


def capture(path: str, nsamples: int = 16, seqlen: int = 2048, seed: int = 0) -> None:
    """Capture the reference calibration sample (same windows as calibrate.py) and save it."""
    from kvquant_hf.calibration import capture_calibration_sample, sample_windows, tokenize_calibration_text
    from kvquant_hf.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2")
    with open(VALID_TEXT, encoding="utf-8") as f:
        ids = tokenize_calibration_text(tok, f.read())
    windows, _ = sample_windows(ids, nsamples, seqlen, seed)
    sample = capture_calibration_sample(model, windows, sink_tokens=1, fisher_weighting="fisher", seed=seed)
    torch.save(sample, path)


def _encode(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    mids = quant.signpost_midpoints(lut)
    codes = torch.zeros(x.shape, dtype=torch.long)
    for m in mids:
        codes += x > m
    return codes


def optimize_key_thresholds(
    keys: torch.Tensor, weight: torch.Tensor, lut: torch.Tensor, n_slots: int, start_fraction: float = 0.01,
    max_rows: int = 8192, sweeps: int = 3, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(lower, upper) [H, D]`` minimizing the weighted error of the slot-aware key quantizer.

    Args:
        keys: ``[n, H, D]`` pre-RoPE calibration keys. weight: ``[H, D]`` channel importance (mean Fisher).
        lut: the key table the thresholds are tuned for. n_slots: 0 or 1 modelled exactly (more: as 1).
    """
    g = torch.Generator().manual_seed(seed)
    n, h, d = keys.shape
    rows = torch.randperm(n, generator=g)[: min(n, max_rows)]
    x_all = keys[rows].to(torch.float32).transpose(0, 1)  # [H, m, D]
    m = x_all.shape[1]
    fr = torch.tensor(FRACTIONS)
    srt = torch.sort(x_all, dim=1).values
    i0 = (fr / 2 * (m - 1)).round().long()
    i1 = ((1 - fr / 2) * (m - 1)).round().long()
    lo_c, hi_c = srt[:, i0], srt[:, i1]  # [H, K, D]
    start = int(torch.argmin((fr - start_fraction).abs()))
    ar = torch.arange(d)
    lowers, uppers = [], []
    for head in range(h):
        x = x_all[head][:, :, None]  # [m, D, 1]
        lo, hi = lo_c[head].T[None], hi_c[head].T[None]  # [1, D, K]
        zero, scale = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(quant.MIN_SCALE)
        excess = torch.maximum(lo - x, x - hi).clamp_min(0) / scale  # [m, D, K]
        xn = (torch.minimum(torch.maximum(x, lo), hi) - zero) / scale
        err = (lut[_encode(xn, lut)] * scale + zero - x).square() * weight[head][None, :, None]
        choice = torch.full((d,), start, dtype=torch.long)
        best = float("inf")
        for _ in range(sweeps):
            changed = False
            for c in range(d):
                e, ex = err[:, ar, choice], excess[:, ar, choice]  # [m, D]
                base = e.sum() - e[:, c].sum()
                ec, xc = err[:, c, :], excess[:, c, :]  # [m, K]
                if n_slots == 0:
                    tot = base + ec.sum(0)
                else:
                    ex_o = ex.clone()
                    ex_o[:, c] = -1.0
                    top, idx = ex_o.max(-1)
                    gain_o = torch.where(top > 0, e.gather(1, idx[:, None])[:, 0], torch.zeros(()))
                    gain = torch.where((xc > top[:, None]) & (xc > 0), ec, gain_o[:, None])
                    tot = base + ec.sum(0) - gain.sum(0)
                k = int(tot.argmin())
                if float(tot[k]) < best - 1e-12 * max(1.0, abs(best)) and k != int(choice[c]):
                    choice[c] = k
                    changed = True
                best = min(best, float(tot[k]))
            if not changed:
                break
        lowers.append(lo_c[head][choice, ar])
        uppers.append(hi_c[head][choice, ar])
    return torch.stack(lowers), torch.stack(uppers)


def weighted_table(x_in: torch.Tensor, w_in: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    from kvquant_hf.calibration import kmeans_subsample, weighted_kmeans_1d

    pts, w = kmeans_subsample(x_in, w_in, 200_000, seed)
    return weighted_kmeans_1d(pts, w, 2**bits, seed, 3)


def make_variant(args) -> None:
    from kvquant_hf.calibration import normalize_keys, normalize_values, qnorm_stats
    from kvquant_hf.config import default_outlier_slots
    from kvquant_hf.signposts import LayerSignposts, Signposts, load_signposts, save_signposts

    t0 = time.time()
    sample = torch.load(args.sample, weights_only=False)
    h, d = sample.num_kv_heads, sample.head_dim
    for bits in args.bits:
        base = load_signposts(args.base, bits=bits)
        n_slots = default_outlier_slots(base.outlier_fraction, d) if args.slots is None else args.slots
        layers = []
        for i, bl in enumerate(base.layers):
            k = sample.keys[i].view(-1, h, d)
            v = sample.values[i].view(-1, h, d)
            kf = sample.key_fisher[i].view(-1, h, d).mean(0)  # [H, D] channel importance
            vf = sample.value_fisher[i].view(-1, h, d).mean(0)
            k_lut = {"base": bl.key_signposts, "uniform": quant.uniform_signposts(bits)}.get(args.key_lut)
            lower, upper = bl.key_lower, bl.key_upper
            if args.key_thresholds == "fisher-opt":
                lut_for_thr = k_lut if k_lut is not None else quant.uniform_signposts(bits)
                lower, upper = optimize_key_thresholds(k, kf, lut_for_thr, n_slots, seed=args.seed + i)
            kx, kin, kscale = normalize_keys(k, lower, upper)
            if k_lut is None:  # kmeans-fc
                k_lut = weighted_table(kx[kin], (kf * kscale.square()).expand_as(kx)[kin], bits, args.seed + 2 * i)
            vx, vin, vscale = normalize_values(v, n_slots, sample.model_dtype)
            v_lut = {"base": bl.value_signposts, "uniform": quant.uniform_signposts(bits)}.get(args.value_lut)
            if v_lut is None:
                v_lut = weighted_table(vx[vin], (vf * vscale.square())[vin], bits, args.seed + 2 * i + 1)
            layers.append(LayerSignposts(k_lut.float(), v_lut.float(), lower.float().contiguous(),
                                         upper.float().contiguous(), qnorm_stats(kx[kin], k_lut),
                                         qnorm_stats(vx[vin], v_lut)))
            print(f"nuq{bits} layer {i} done ({time.time() - t0:.0f} s)", flush=True)
        meta = json.loads(json.dumps(base.metadata))
        meta.pop("files", None)
        meta["variant"] = {
            "tool": "benchmarks/signpost_variants_smollm2.py", "base": os.path.abspath(args.base),
            "key_thresholds": args.key_thresholds, "key_lut": args.key_lut, "value_lut": args.value_lut,
            "slots_modelled": n_slots, "fractions_tried": list(FRACTIONS), "sample": args.sample,
            "tuning_s": round(time.time() - t0, 1), "created": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        meta["calibration"]["duration_s"] = round(float(meta["calibration"].get("duration_s", 0.0))
                                                  + time.time() - t0, 2)
        save_signposts(Signposts(layers, meta), args.output)
        print(f"wrote {args.output}/nuq{bits}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capture", default=None, help="capture the calibration sample to this .pt and exit")
    p.add_argument("--sample", default=None, help="captured calibration sample (.pt)")
    p.add_argument("--base", default="/work/signposts/smollm2-1pct", help="reference signposts (metadata, tables)")
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    p.add_argument("--key-thresholds", choices=["percentile", "fisher-opt"], default="fisher-opt")
    p.add_argument("--key-lut", choices=["base", "uniform", "kmeans-fc"], default="uniform")
    p.add_argument("--value-lut", choices=["base", "uniform", "kmeans-fc"], default="uniform")
    p.add_argument("--slots", type=int, default=None, help="slots to tune for (default: from the base fraction)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.capture:
        capture(args.capture)
        return
    if not args.sample or not args.output:
        p.error("--sample and --output are required (or --capture PATH first)")
    make_variant(args)


if __name__ == "__main__":
    main()
