"""One layer of decode attention at long context: fp16 SDPA on unquantized K/V vs the fused packed kernel.

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), batch 1 and 8, contexts
4K/32K/128K/512K. The packed cache holds random codes (nuq4/3/2 with 1% outliers = 2 slots per token
and head for keys and values), an exact block of 5 tokens (4 sink + the new token) and consecutive
positions; the baseline is ``torch.nn.functional.scaled_dot_product_attention`` in fp16 over the same
context (GQA folded into the query length, and ``enable_gqa=True``; the faster one is the baseline).
Times are ``triton.testing.do_bench`` medians (the L2 is flushed between calls). Bytes are what a
call must read (packed history incl. outlier slots, scales and positions, exact block, queries) and
write; GB/s is compared with a measured device-to-device copy. Append cost: the two quantize kernels
for one new token per sequence (decode) and for a 4096-token chunk.

Usage: ``PYTHONPATH=. python benchmarks/decode_attention.py [--contexts 4096 ...] [--batches 1 8]
[--sweep | --quick] [--kernel auto|old|decode] [--lut uniform|nf] [--cfg JSON] [--tag SUFFIX]``; writes
``decode_attention<tag>.md`` and ``.csv`` under $OUT (else benchmarks/results/). ``--quick``: batch 1 @ 128K,
nuq4/nuq2, default config plus a small sweep of the kernel knobs (a couple of minutes). ``--kernel old`` forces the
general split kernel (the pre-fast-path code), ``decode`` the decode fast path. ``--lut nf``: NormalFloat
signposts (the per-code-pair gather path) instead of the uniform grid (affine path).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvquant_hf.quant import value_scale_dtype
from kvquant_hf.kernels import packed_attention_triton, quantize_keys_triton, quantize_values_triton
from kvquant_hf.kernels.decode_attention import default_num_splits

HQ, H, D = 32, 8, 128
DEV = "cuda"
SMOKE = False
SINK = 4
SLOTS = 2  # 1% of 128 channels, rounded up
DTYPE = torch.float16  # model dtype of the queries, exact block, slots and value scales (--dtype)
LUT = "uniform"  # signpost tables of the random cache: "uniform" (affine grid) or "nf" (NormalFloat, gathered)
BASE_CFG: dict = {}  # kernel options of every packed call (--kernel / --cfg)


class Packed:
    """Duck-typed ``kvquant_hf.attention.PackedKV`` (the kernel reads attributes only)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _bench(fn) -> float:
    if SMOKE:  # CPU interpreter: one timed call, just to exercise the script
        import time

        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _bench_graph(fn) -> float:
    """Median time of ``fn`` replayed from a CUDA graph: GPU time without Python launch overhead."""
    if SMOKE:
        return _bench(fn)
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def kernel_breakdown(fn, n: int = 10) -> str:
    """Device time per kernel name (profiler), averaged over ``n`` calls."""
    if SMOKE:
        return ""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    parts = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            parts.append(f"{ev.key[:40]}: {t / n:.1f} us")
    return "; ".join(parts)


def copy_bandwidth_gbs(nbytes: int = 4 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    src.random_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_packed(b, length, bits, slots, dtype=None):
    dtype = dtype or DTYPE
    """Random packed cache (codes and slots are random bytes: speed does not depend on the values)."""
    dev = DEV
    nb = D * bits // 8
    kc = torch.randint(0, 256, (b, H, length, nb), dtype=torch.uint8, device=dev)
    vc = torch.randint(0, 256, (b, H, length, nb), dtype=torch.uint8, device=dev)
    kidx = torch.randint(0, D, (b, H, length, slots), dtype=torch.uint8, device=dev)
    if slots:
        kidx[..., -1:][torch.rand(b, H, length, 1, device=dev) < 0.5] = 255  # half the key slots unused
    vidx = torch.randint(0, D, (b, H, length, slots), dtype=torch.uint8, device=dev)
    return Packed(
        k_codes=kc, k_out_val=torch.randn(b, H, length, slots, dtype=dtype, device=dev), k_out_idx=kidx,
        v_codes=vc, v_scale=(torch.rand(b, H, length, device=dev) * 0.1 + 0.01).to(dtype),
        v_zero=(torch.randn(b, H, length, device=dev) * 0.1).to(dtype),
        v_out_val=torch.randn(b, H, length, slots, dtype=dtype, device=dev), v_out_idx=vidx,
        k_lut=_lut(bits), v_lut=_lut(bits),
        k_zero=torch.randn(H, D, device=dev) * 0.1, k_scale=torch.rand(H, D, device=dev) + 0.5,
        positions=torch.arange(length, dtype=torch.int32, device=dev)[None].repeat(b, 1),
        length=length, key_bits=bits, value_bits=bits, head_dim=D,
    )


def _lut(bits):
    if LUT == "nf":
        from kvquant_hf.quant import normal_float_signposts

        return normal_float_signposts(bits).to(DEV)
    return torch.linspace(-1, 1, 2**bits, device=DEV)


def packed_bytes(p, b, length, e, lq=1) -> int:
    hist = sum(
        t[:, :, :length].numel() * t.element_size()
        for t in (p.k_codes, p.k_out_val, p.k_out_idx, p.v_codes, p.v_scale, p.v_zero, p.v_out_val, p.v_out_idx)
    )
    hist += b * length * 4  # positions
    exact = 2 * b * H * e * D * 2
    qo = 2 * b * HQ * lq * D * 2
    return hist + exact + qo


def inv_freq():
    return 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device=DEV) / D))


def bench_sdpa(b, length):
    k = torch.randn(b, H, length, D, dtype=DTYPE, device=DEV)
    v = torch.randn(b, H, length, D, dtype=DTYPE, device=DEV)
    q = torch.randn(b, HQ, 1, D, dtype=DTYPE, device=DEV)
    qf = q.view(b, H, HQ // H, D)  # GQA folded into the query length: each KV head read once
    t_fold = _bench(lambda: F.scaled_dot_product_attention(qf, k, v, scale=D ** -0.5))
    gqa = lambda: F.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, enable_gqa=True)
    t_gqa = _bench(gqa)
    t_gqa_graph = _bench_graph(gqa)
    nbytes = 2 * k.numel() * 2 + 2 * q.numel() * 2
    return t_fold, t_gqa, t_gqa_graph, nbytes


def run_packed(p, b, length, breakdown=False, **cfg):
    q = torch.randn(b, HQ, 1, D, dtype=DTYPE, device=DEV)
    ek = torch.randn(b, H, SINK + 1, D, dtype=DTYPE, device=DEV)
    ev = torch.randn(b, H, SINK + 1, D, dtype=DTYPE, device=DEV)
    freq = inv_freq()
    cfg = {**BASE_CFG, **cfg}
    fn = lambda: packed_attention_triton(q, p, ek, ev, None, scaling=D ** -0.5, inv_freq=freq, **cfg)
    out = fn()
    assert torch.isfinite(out).all(), "non-finite output"
    if breakdown:
        print("breakdown", cfg, kernel_breakdown(fn), flush=True)
    return _bench(fn), _bench_graph(fn)


def dump_kernel(tag: str, out_dir: str) -> None:
    """Registers/spills of the last stage-1 kernel, its TTGIR and SASS (cuobjdump) under ``out_dir``."""
    from kvquant_hf.kernels import decode_attention as da

    k = da._LAST_KERNELS.get("split")
    if k is None:
        return
    print(f"{tag}: n_regs={getattr(k, 'n_regs', '?')} n_spills={getattr(k, 'n_spills', '?')} "
          f"shared={getattr(k, 'metadata', None) and k.metadata.shared}", flush=True)
    try:
        with open(os.path.join(out_dir, f"{tag}.ttgir"), "w") as fh:
            fh.write(k.asm["ttgir"])
        cubin = os.path.join("/tmp", f"{tag}.cubin")
        with open(cubin, "wb") as fh:
            fh.write(k.asm["cubin"])
        os.system(f"cuobjdump -sass {cubin} > {os.path.join(out_dir, tag + '.sass')} 2>&1")
    except Exception as exc:  # noqa: BLE001 -- the SASS dump is optional
        print("dump failed:", exc)


def bench_append(b, s, bits, dtype=None):
    dtype = dtype or DTYPE
    sd = value_scale_dtype(dtype)
    cap = s + 16
    k = torch.randn(b, H, s, D, dtype=dtype, device=DEV)
    v = torch.randn(b, H, s, D, dtype=dtype, device=DEV)
    lut = torch.linspace(-1, 1, 2**bits, device=DEV)
    lo, hi = -torch.ones(H, D, device=DEV) * 2, torch.ones(H, D, device=DEV) * 2
    zero, scale = (hi + lo) * 0.5, (hi - lo) * 0.5
    nb = D * bits // 8
    kout = (torch.empty(b, H, cap, nb, dtype=torch.uint8, device=DEV),
            torch.empty(b, H, cap, SLOTS, dtype=dtype, device=DEV),
            torch.empty(b, H, cap, SLOTS, dtype=torch.uint8, device=DEV))
    vout = (torch.empty(b, H, cap, nb, dtype=torch.uint8, device=DEV),
            torch.empty(b, H, cap, dtype=sd, device=DEV),
            torch.empty(b, H, cap, dtype=sd, device=DEV),
            torch.empty(b, H, cap, SLOTS, dtype=dtype, device=DEV),
            torch.empty(b, H, cap, SLOTS, dtype=torch.uint8, device=DEV))

    def fn():
        quantize_keys_triton(k, lut, lo, hi, SLOTS, bits, out=kout, start=3, k_zero=zero, k_scale=scale)
        quantize_values_triton(v, lut, SLOTS, bits, out=vout, start=3)

    fn()
    return _bench(fn), _bench_graph(fn)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072, 524288])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--sweep", action="store_true", help="also sweep kernel configs at batch 1, 128K")
    ap.add_argument("--dump", type=int, nargs="*", default=[], help="bits whose stage-1 TTGIR/SASS to save")
    ap.add_argument("--quick", action="store_true",
                    help="batch 1 @ 128K only: fp16 SDPA, nuq4/nuq2 with the default config and a small config sweep")
    ap.add_argument("--kernel", choices=["auto", "old", "decode"], default="auto",
                    help="stage-1 kernel: auto (decode fast path where it applies), old (general split kernel), decode")
    ap.add_argument("--lut", choices=["uniform", "nf"], default="uniform",
                    help="signpost tables: uniform grid (affine fast path) or NormalFloat (per-code gather)")
    ap.add_argument("--cfg", default="", help="JSON dict of extra kernel options for every packed call")
    ap.add_argument("--no-append", action="store_true", help="skip the append (quantize kernel) rows")
    ap.add_argument("--tag", default="", help="suffix of the output files (decode_attention<tag>.md/.csv)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                    help="model dtype (bf16 takes the decode fast path only with --kernel decode, for now)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes on CPU under TRITON_INTERPRET=1 (checks this script, not the GPU)")
    args = ap.parse_args(argv)
    global DEV, SMOKE, HQ, H, LUT, DTYPE
    LUT = args.lut
    DTYPE = getattr(torch, args.dtype)
    BASE_CFG.clear()
    if args.kernel != "auto":
        BASE_CFG["decode_kernel"] = args.kernel == "decode"
    if args.cfg:
        import json

        BASE_CFG.update(json.loads(args.cfg))
    if args.quick:
        args.contexts, args.batches = [131072], [1]
        args.bits = [b for b in args.bits if b != 3]
        args.no_append = True
    if args.smoke:
        DEV, SMOKE, HQ, H = "cpu", True, 8, 2
        args.contexts, args.batches = [96], [1]
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs(1 << 20 if SMOKE else 4 << 30)
    free_gb = 1.0 if SMOKE else torch.cuda.mem_get_info()[0] / 1e9
    print(f"copy bandwidth (read+write): {bw:.0f} GB/s; free memory {free_gb:.0f} GB", flush=True)
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    rows = []
    dumped = set()

    def add(b, length, method, t_eager, t_graph, nbytes, t_ref, note=""):
        """Speedup and bandwidth from the CUDA-graph (GPU) time; the eager time adds Python launch cost."""
        rows.append(dict(batch=b, context=length, method=method, us=t_graph * 1e3, us_eager=t_eager * 1e3,
                         speedup=t_ref / t_graph, mbytes=nbytes / 1e6, gbs=nbytes / (t_graph * 1e-3) / 1e9,
                         pct_copy_bw=100 * nbytes / (t_graph * 1e-3) / 1e9 / bw, note=note))
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)

    for b in args.batches:
        for length in args.contexts:
            fp16_gb = 2 * b * H * length * D * 2 / 1e9
            if fp16_gb * 1.3 > free_gb:
                print(f"skip batch {b} context {length}: fp16 K/V needs {fp16_gb:.0f} GB", flush=True)
                continue
            t_fold, t_gqa, t_sdpa, sdpa_bytes = bench_sdpa(b, length)
            add(b, length, "fp16 SDPA", t_gqa, t_sdpa, sdpa_bytes, t_sdpa,
                note=f"enable_gqa; GQA folded into q_len: {t_fold * 1e3:.1f} us eager")
            gc.collect()
            if not SMOKE:
                torch.cuda.empty_cache()
            for bits in args.bits:
                p = make_packed(b, length, bits, SLOTS)
                nbytes = packed_bytes(p, b, length, SINK + 1)
                sweep = (args.sweep or args.quick) and b == 1 and (length == 131072 or SMOKE) and bits in (
                    (4, 2) if args.quick else (4,))
                te, tg = run_packed(p, b, length, breakdown=sweep or (b == 1 and length == 131072))
                if bits in args.dump and bits not in dumped:
                    dump_kernel(f"stage1_nuq{bits}", out)
                    dumped.add(bits)
                splits = default_num_splits(b, H, 1, length, torch.device(DEV), 32)
                add(b, length, f"nuq{bits}-1%", te, tg, nbytes, t_sdpa, note=f"default config, splits {splits}")
                variants = []
                if sweep and args.quick:
                    variants = [dict(block_n=64, num_warps=8), dict(maxnreg=168), dict(prefetch=False),
                                dict(prefetch=False, maxnreg=168), dict(key_f32=False),
                                dict(key_f32=False, maxnreg=168), dict(sparse_key_slots=True), dict(num_splits=splits * 2)]
                    if args.kernel == "old":
                        variants = [dict(block_n=16, num_warps=4), dict(block_n=64, num_warps=4),
                                    dict(block_n=32, num_warps=8), dict(num_splits=splits * 2)]
                elif sweep:
                    variants = [dict(block_n=32, num_warps=8), dict(block_n=64, num_warps=4),
                                dict(block_n=32, num_warps=4, maxnreg=128), dict(block_n=16, num_warps=4, maxnreg=96),
                                dict(block_n=32, num_warps=8, maxnreg=128), dict(block_n=64, num_warps=8, maxnreg=128),
                                dict(rope_table=False), dict(num_splits=splits * 2), dict(num_splits=splits * 4)]
                if sweep:
                    for cfg in variants:
                        try:
                            tve, tvg = run_packed(p, b, length, **cfg)
                        except Exception as exc:  # noqa: BLE001 -- a sweep variant may not compile
                            print("variant failed", cfg, repr(exc)[:300], flush=True)
                            continue
                        add(b, length, f"nuq{bits}-1% sweep", tve, tvg, nbytes, t_sdpa, note=str(cfg))
                    p0 = make_packed(b, length, bits, 0)
                    n0 = packed_bytes(p0, b, length, SINK + 1)
                    te0, tg0 = run_packed(p0, b, length)
                    add(b, length, f"nuq{bits}-0% (no slots)", te0, tg0, n0, t_sdpa, note="0 outlier slots")
                    del p0
                del p
                gc.collect()
                if not SMOKE:
                    torch.cuda.empty_cache()

    append_rows = []
    for bits in ([] if args.no_append else args.bits):
        for b, s in ((1, 1), (8, 1), (1, 4096)) if not SMOKE else ((1, 1), (1, 7)):
            te, tg = bench_append(b, s, bits)
            append_rows.append(dict(bits=bits, batch=b, new_tokens=s, us_per_call=tg * 1e3, us_eager=te * 1e3,
                                    us_per_token=tg * 1e3 / s))
            print(append_rows[-1], flush=True)

    cols = ["batch", "context", "method", "us", "us_eager", "speedup", "mbytes", "gbs", "pct_copy_bw", "note"]
    tag = args.tag
    with open(os.path.join(out, f"decode_attention{tag}.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    if append_rows:
        with open(os.path.join(out, f"decode_attention_append{tag}.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(append_rows[0].keys()))
            w.writeheader()
            w.writerows(append_rows)
    lines = [
        "# Decode attention, one layer, Llama-3-8B shape (32 q heads, 8 KV heads, head_dim 128)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- device: {'cpu smoke run' if SMOKE else torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"triton {triton.__version__}",
        f"- command: `PYTHONPATH=. python benchmarks/decode_attention.py {' '.join(sys.argv[1:])}`",
        f"- measured device-to-device copy bandwidth (read + write): {bw:.0f} GB/s",
        f"- model dtype: {str(DTYPE).replace('torch.', '')}; signpost tables: {LUT}; kernel options: {BASE_CFG or 'defaults'}",
        "",
        "Times: `us` = CUDA-graph replay (GPU time; speedup, GB/s and % use it), `eager` = plain Python calls",
        "(adds the launch overhead of the Triton launchers).",
        "",
        "| batch | context | method | us | eager us | speedup vs fp16 | MB read+written | GB/s | % of copy BW | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context']} | {r['method']} | {r['us']:.1f} | {r['us_eager']:.1f} | "
                     f"{r['speedup']:.2f}x | "
                     f"{r['mbytes']:.1f} | {r['gbs']:.0f} | {r['pct_copy_bw']:.0f}% | {r['note']} |")
    lines += ["", "## Append (quantize kernels: keys + values, 2 slots)", "",
              "| bits | batch | new tokens | us per call (graph) | eager us | us per token |",
              "|---|---|---|---|---|---|"]
    for r in append_rows:
        lines.append(f"| {r['bits']} | {r['batch']} | {r['new_tokens']} | {r['us_per_call']:.1f} | "
                     f"{r['us_eager']:.1f} | "
                     f"{r['us_per_token']:.3f} |")
    with open(os.path.join(out, f"decode_attention{tag}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
