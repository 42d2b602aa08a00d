"""GPU correctness of the Triton kernels at real sizes (run on a CUDA machine).

* ``quantize_keys_triton`` / ``quantize_values_triton``: bit identity with ``kvquant_hf.quant`` (codes,
  slots, scales) for a prefill chunk and a one-token append, fp16 and bf16, 2/3/4 bits.
* ``packed_attention_triton`` vs ``kvquant_hf.attention.packed_attention_torch`` (float32 math):
  max abs error and ``||out - ref|| / ||ref||`` for fp16 and bf16, decode (GQA 4, sink + new token,
  left padding with a position reset), a prefill chunk over the history with a sliding window, and
  head_dim 64. The packed cache is written by the quantize kernels straight into preallocated storage.

Usage: ``PYTHONPATH=. python benchmarks/check_kernels_gpu.py [--quick]``; writes
``check_kernels_gpu.md`` and ``.csv`` under $OUT (else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _oracle

quant, attention = _oracle.load()
from kvquant_hf.kernels import packed_attention_triton, quantize_keys_triton, quantize_values_triton

REL_TOL = 1e-2
DEV = "cuda"


def _out_dir() -> str:
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    return out


def check_quantize(dtype, bits, b, h, s, d, n_slots, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    k = torch.randn(b, h, s, d, device=DEV, generator=g) * 2
    k[..., 7] += 6
    k = k.to(dtype)
    v = (torch.randn(b, h, s, d, device=DEV, generator=g) * 3).to(dtype)
    lut = quant.normal_float_signposts(bits).to(DEV)
    lo, hi = quant.key_thresholds_from_sample(k.float(), 0.02)
    rk = quant.quantize_keys(k, lut, lo, hi, n_slots, bits)
    rv = quant.quantize_values(v, lut, n_slots, bits)
    counter = torch.zeros(1, dtype=torch.int32, device=DEV)
    gk = quantize_keys_triton(k, lut, lo, hi, n_slots, bits, clip_counter=counter)
    gv = quantize_values_triton(v, lut, n_slots, bits)
    mism = {}
    for f in ("codes", "out_val", "out_idx"):
        mism["k_" + f] = int((getattr(gk, f) != getattr(rk, f)).sum())
    for f in ("codes", "scale", "zero", "out_val", "out_idx"):
        mism["v_" + f] = int((getattr(gv, f) != getattr(rv, f)).sum())
    mism["k_clipped"] = abs(int(counter) - rk.n_clipped)
    return mism


def build_cache(b, h, length, d, bits, n_slots, dtype, seed, cap_extra=64, pad=None, gap=None, uniform=False):
    """A packed cache filled by the quantize kernels (one launch per tensor), plus its PackedKV view."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    cap = length + cap_extra
    sd = quant.value_scale_dtype(dtype)
    k = (torch.randn(b, h, length, d, device=DEV, generator=g) * 2)
    k[..., 3] *= 5
    v = torch.randn(b, h, length, d, device=DEV, generator=g)
    table = quant.uniform_signposts if uniform else quant.normal_float_signposts  # uniform: affine fast path
    klut = table(bits).to(DEV)
    vlut = table(bits).to(DEV)
    lo, hi = quant.key_thresholds_from_sample(k[:, :, : min(length, 4096)], 0.01)
    zero, scale = quant.key_zero_scale(lo, hi)
    store = dict(
        k_codes=torch.zeros(b, h, cap, d * bits // 8, dtype=torch.uint8, device=DEV),
        k_out_val=torch.zeros(b, h, cap, n_slots, dtype=dtype, device=DEV),
        k_out_idx=torch.full((b, h, cap, n_slots), 255, dtype=torch.uint8, device=DEV),
        v_codes=torch.zeros(b, h, cap, d * bits // 8, dtype=torch.uint8, device=DEV),
        v_scale=torch.ones(b, h, cap, dtype=sd, device=DEV),
        v_zero=torch.zeros(b, h, cap, dtype=sd, device=DEV),
        v_out_val=torch.zeros(b, h, cap, n_slots, dtype=dtype, device=DEV),
        v_out_idx=torch.full((b, h, cap, n_slots), 255, dtype=torch.uint8, device=DEV),
    )
    quantize_keys_triton(k.to(dtype), klut, lo, hi, n_slots, bits,
                         out=(store["k_codes"], store["k_out_val"], store["k_out_idx"]), start=0,
                         k_zero=zero, k_scale=scale)
    quantize_values_triton(v.to(dtype), vlut, n_slots, bits,
                           out=(store["v_codes"], store["v_scale"], store["v_zero"], store["v_out_val"],
                                store["v_out_idx"]), start=0)
    positions = torch.arange(cap, dtype=torch.int32, device=DEV)[None].repeat(b, 1)
    if pad is not None:  # left padding: masked tokens, then positions restart at 0
        for i, p in enumerate(pad):
            positions[i, :p] = 1
            positions[i, p:] = torch.arange(cap - p, dtype=torch.int32, device=DEV)
    if gap is not None:  # a jump in the positions mid-block: that block takes the exact-RoPE path
        positions[:, gap:] += 7
    return attention.PackedKV(**store, k_lut=klut, v_lut=vlut, k_zero=zero, k_scale=scale, positions=positions,
                              length=length, key_bits=bits, value_bits=bits, head_dim=d)


def attention_inputs(b, hq, h, d, lq, sink, dtype, seed, pad=None):
    """Random queries, an exact block of ``sink`` tokens + the ``lq`` new ones (causal among themselves), and the
    keyword arguments of the attention functions (Llama-3 RoPE base, ``hist_start`` = ``pad`` when given)."""
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    e = sink + lq
    q = torch.randn(b, hq, lq, d, device=DEV, generator=g).to(dtype)
    ek = torch.randn(b, h, e, d, device=DEV, generator=g).to(dtype)
    ev = torch.randn(b, h, e, d, device=DEV, generator=g).to(dtype)
    mask = torch.ones(b, lq, e, dtype=torch.bool, device=DEV)
    mask[:, :, sink:] = torch.tril(torch.ones(lq, lq, dtype=torch.bool, device=DEV))
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=DEV) / d))
    kw = dict(scaling=d ** -0.5, inv_freq=inv_freq, attention_scaling=1.0)
    if pad is not None:
        kw["hist_start"] = torch.tensor(pad, dtype=torch.int64, device=DEV)
    return q, ek, ev, mask, kw


def check_attention(name, dtype, bits, b, hq, h, d, length, lq, sink, window=None, pad=None, n_slots=2, seed=0,
                    num_splits=None, gap=None, **kernel_kw):
    packed = build_cache(b, h, length, d, bits, n_slots, dtype, seed, pad=pad, gap=gap, uniform="uniform" in name)
    q, ek, ev, mask, kw = attention_inputs(b, hq, h, d, lq, sink, dtype, seed, pad)
    q_pos = packed.positions[:, length - 1:length].long() + 1 + torch.arange(lq, device=DEV)[None]
    if window is not None:
        kw.update(q_positions=q_pos, window=window)
    ref = attention.packed_attention_torch(q, packed, ek, ev, mask, **kw).float()
    out = packed_attention_triton(q, packed, ek, ev, mask, num_splits=num_splits, **kw, **kernel_kw).float()
    finite = bool(torch.isfinite(out).all())
    err = (out - ref).abs().max().item()
    rel = ((out - ref).norm() / ref.norm()).item()
    return dict(case=name, dtype=str(dtype).replace("torch.", ""), bits=bits, batch=b, q_heads=hq, kv_heads=h,
                head_dim=d, history=length, q_len=lq, max_abs_err=err, rel_err=rel, finite=finite,
                ok=finite and rel < REL_TOL)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller history lengths")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes on CPU under TRITON_INTERPRET=1 (checks this script, not the GPU)")
    args = ap.parse_args(argv)
    global DEV
    if args.smoke:
        DEV = "cpu"
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)"
    long_len = 8192 if args.quick else 32768
    cap = (lambda n: min(n, 200)) if args.smoke else (lambda n: n)
    rows, qrows, failures = [], [], 0

    for dtype in (torch.float16, torch.bfloat16):
        for bits in (2, 3, 4):
            if args.smoke and dtype == torch.bfloat16:
                continue
            for (b, h, s, d, ns) in ((2, 8, cap(4096), 128, 2), (3, 8, 1, 128, 2), (1, 4, cap(777), 64, 1)):
                try:
                    mism = check_quantize(dtype, bits, b, h, s, d, ns, seed=bits + s)
                    ok = all(v == 0 for v in mism.values())
                except Exception:  # noqa: BLE001 -- report and continue: one run of this script should say everything
                    traceback.print_exc()
                    mism, ok = {"error": 1}, False
                failures += not ok
                qrows.append(dict(dtype=str(dtype).replace("torch.", ""), bits=bits, shape=f"{b}x{h}x{s}x{d}",
                                  slots=ns, ok=ok, mismatches=sum(mism.values())))
                print("quantize", qrows[-1], flush=True)

    cases = [
        # name, bits, b, hq, h, d, length, lq, sink, window, pad
        ("decode", 4, 2, 32, 8, 128, long_len, 1, 4, None, [0, 1000]),
        ("decode", 3, 2, 32, 8, 128, long_len, 1, 4, None, [0, 1000]),
        ("decode", 2, 2, 32, 8, 128, long_len, 1, 4, None, [0, 1000]),
        ("decode-gqa8+gap", 4, 1, 64, 8, 128, 5000, 1, 1, None, None),
        ("decode-d64", 3, 1, 8, 2, 64, 16384, 1, 1, None, None),
        ("prefill-chunk+window", 4, 1, 32, 8, 128, 8192, 64, 4, 4096, None),
        ("prefill-chunk", 2, 2, 32, 8, 128, 3000, 16, 0, None, [0, 17]),
        ("decode-short", 4, 1, 32, 8, 128, 37, 1, 1, None, None),
        # fp16 decode rows above take the decode fast path (gathered tables); uniform tables: its affine path
        ("decode-uniform", 4, 2, 32, 8, 128, long_len, 1, 4, None, [0, 1000]),
        ("decode-uniform+gap", 2, 1, 64, 8, 128, 5000, 1, 1, None, None),
        ("decode-d64-uniform", 4, 1, 8, 2, 64, 16384, 1, 1, None, None),
    ]
    for dtype in (torch.float16, torch.bfloat16):
        for name, bits, b, hq, h, d, length, lq, sink, window, pad in cases:
            if args.smoke:
                if dtype == torch.bfloat16:
                    continue  # the interpreter has no bf16 arithmetic
                length, pad, window = cap(length), ([0, 17] if pad else None), (window and 150)
            try:
                row = check_attention(name, dtype, bits, b, hq, h, d, length, lq, sink, window, pad,
                                      gap=1003 if "gap" in name else None)
            except Exception:  # noqa: BLE001 -- a crash is a failed case in the report
                traceback.print_exc()
                row = dict(case=name, dtype=str(dtype), bits=bits, ok=False, rel_err=float("nan"))
            failures += not row["ok"]
            rows.append(row)
            print("attention", {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            if dtype == torch.bfloat16 and lq == 1 and bits in (2, 4) and not args.smoke:
                # the bf16 decode fast path is opt-in (decode_kernel=True) until these rows pass
                try:
                    row = check_attention(name + " (bf16 fast path)", dtype, bits, b, hq, h, d, length, lq, sink,
                                          window, pad, gap=1003 if "gap" in name else None, decode_kernel=True)
                except Exception:  # noqa: BLE001 -- a crash is a failed case in the report
                    traceback.print_exc()
                    row = dict(case=name + " (bf16 fast path)", dtype=str(dtype), bits=bits, ok=False,
                               rel_err=float("nan"))
                failures += not row["ok"]
                rows.append(row)
                print("attention", {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()},
                      flush=True)

    out = _out_dir()
    with open(os.path.join(out, "check_kernels_gpu.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(r for r in rows if set(r) == set(rows[0]))
    lines = [
        "# Triton kernels vs the torch oracle on GPU",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- device: {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu (interpreter smoke run)'}; "
        f"torch {torch.__version__}",
        f"- command: `PYTHONPATH=. python benchmarks/check_kernels_gpu.py{' --quick' if args.quick else ''}`",
        "",
        "## quantize kernels (bit identity with kvquant_hf.quant)",
        "",
        "| dtype | bits | B x H x S x D | slots | identical | mismatching elements |",
        "|---|---|---|---|---|---|",
    ]
    for r in qrows:
        lines.append(f"| {r['dtype']} | {r['bits']} | {r['shape']} | {r['slots']} | {r['ok']} | {r['mismatches']} |")
    lines += ["", "## packed attention vs packed_attention_torch (float32)", "",
              "| case | dtype | bits | B | Hq/H | D | history | q_len | max abs err | rel err | ok |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['bits']} | {r.get('batch', '')} | {r.get('q_heads', '')}/"
            f"{r.get('kv_heads', '')} | {r.get('head_dim', '')} | {r.get('history', '')} | {r.get('q_len', '')} | "
            f"{r.get('max_abs_err', float('nan')):.2e} | {r['rel_err']:.2e} | {r['ok']} |"
        )
    with open(os.path.join(out, "check_kernels_gpu.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"FAILURES: {failures}")
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
