"""One layer of decode attention at long context: fp16 SDPA on unquantized K/V vs the packed cache's kernels.

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), batch 1 and 8, contexts
4K/32K/128K/512K. The packed cache holds random codes (nuq4/3/2 with 1% outliers = 2 slots per token
and head for keys and values), an exact block of 5 tokens (4 sink + the new token) and consecutive
positions; the baseline is ``torch.nn.functional.scaled_dot_product_attention`` in fp16 over the same
context (``enable_gqa=True``; GQA folded into the query length is reported in the note). Times are
``triton.testing.do_bench`` medians: ``us`` replays the call from a CUDA graph (GPU time), ``us_eager`` adds the
Python launch cost. Bytes are what a call must read (packed history incl. outlier slots, scales and positions,
exact block, queries) and write; GB/s is compared with a measured device-to-device copy. Append cost: the
quantize kernels for one new token per sequence (decode) and for a 4096-token chunk.

Usage (about 2 minutes on one H100)::

    PYTHONPATH=. python -m benchmarks.decode_attention [--contexts 4096 ...] [--batches 1 8] [--lut uniform|nf]
    python -m benchmarks.decode_attention --smoke     # tiny shapes on CPU (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.nn.functional as F

from benchmarks.common import md_table, write_result
from kvquant_hf.kernels import packed_attention_triton, quantize_keys_triton, quantize_values_triton
from kvquant_hf.kernels.decode_attention import default_num_splits
from kvquant_hf.quant import normal_float_signposts, value_scale_dtype

NAME = "decode_attention"
HQ, H, D = 32, 8, 128
DEV = "cuda"
SMOKE = False
SINK = 4
SLOTS = 2  # 1% of 128 channels, rounded up
DTYPE = torch.float16  # model dtype of the queries, exact block, slots and value scales (--dtype)
LUT = "uniform"  # signpost tables of the random cache: "uniform" (affine grid) or "nf" (NormalFloat, gathered)


def _bench(fn) -> float:
    if SMOKE:  # CPU interpreter: one timed call, just to exercise the script
        import time

        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _bench_graph(fn) -> float:
    """Median time of ``fn`` replayed from a CUDA graph: GPU time without Python launch overhead."""
    if SMOKE:
        return _bench(fn)
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def copy_bandwidth_gbs(nbytes: int = 4 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    src.random_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


class Packed:
    """Duck-typed ``kvquant_hf.attention.PackedKV`` (the kernel reads attributes only)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def make_packed(b, length, bits, slots, dtype=None):
    """Random packed cache (codes and slots are random bytes: speed does not depend on the values)."""
    dtype = dtype or DTYPE
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


def run_packed(p, b, length):
    q = torch.randn(b, HQ, 1, D, dtype=DTYPE, device=DEV)
    ek = torch.randn(b, H, SINK + 1, D, dtype=DTYPE, device=DEV)
    ev = torch.randn(b, H, SINK + 1, D, dtype=DTYPE, device=DEV)
    freq = inv_freq()
    fn = lambda: packed_attention_triton(q, p, ek, ev, None, scaling=D ** -0.5, inv_freq=freq)
    out = fn()
    assert torch.isfinite(out).all(), "non-finite output"
    return _bench(fn), _bench_graph(fn)


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


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072, 524288])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--lut", choices=["uniform", "nf"], default="uniform",
                    help="signpost tables: uniform grid (affine fast path) or NormalFloat (per-code gather)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="model dtype")
    ap.add_argument("--no-append", action="store_true", help="skip the append (quantize kernel) rows")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script, not the GPU)")
    args = ap.parse_args(argv)
    global DEV, SMOKE, HQ, H, LUT, DTYPE
    LUT = args.lut
    DTYPE = getattr(torch, args.dtype)
    if args.smoke:
        DEV, SMOKE, HQ, H = "cpu", True, 8, 2
        args.contexts, args.batches = [96], [1]
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs(1 << 20 if SMOKE else 4 << 30)
    free_gb = 1.0 if SMOKE else torch.cuda.mem_get_info()[0] / 1e9
    print(f"copy bandwidth (read+write): {bw:.0f} GB/s; free memory {free_gb:.0f} GB", flush=True)
    rows: list[dict] = []

    def add(b, length, method, t_eager, t_graph, nbytes, t_ref, note=""):
        """Speedup and bandwidth from the CUDA-graph (GPU) time; the eager time adds Python launch cost."""
        rows.append(dict(section="attention", batch=b, context=length, method=method, us=t_graph * 1e3,
                         us_eager=t_eager * 1e3, speedup=t_ref / t_graph, mbytes=nbytes / 1e6,
                         gbs=nbytes / (t_graph * 1e-3) / 1e9,
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
                te, tg = run_packed(p, b, length)
                splits = default_num_splits(b, H, 1, length, torch.device(DEV), 32)
                add(b, length, f"nuq{bits}-1%", te, tg, nbytes, t_sdpa, note=f"splits {splits}")
                del p
                gc.collect()
                if not SMOKE:
                    torch.cuda.empty_cache()

    for bits in ([] if args.no_append else args.bits):
        for b, s in ((1, 1), (8, 1), (1, 4096)) if not SMOKE else ((1, 1), (1, 7)):
            te, tg = bench_append(b, s, bits)
            rows.append(dict(section="append", bits=bits, batch=b, new_tokens=s, us_per_call=tg * 1e3,
                             us_eager=te * 1e3, us_per_token=tg * 1e3 / s))
            print(rows[-1], flush=True)
    write_result(NAME, rows, render(rows, bw), meta={"lut": LUT, "dtype": args.dtype, "copy_bandwidth_gbs": bw},
                 device=DEV)
    return rows


def render(rows: list[dict], bw: float) -> str:
    att = [dict(r, speedup=f"{r['speedup']:.2f}x", pct_copy_bw=f"{r['pct_copy_bw']:.0f}%")
           for r in rows if r["section"] == "attention"]
    app = [r for r in rows if r["section"] == "append"]
    md = ["# Decode attention, one layer, Llama-3-8B shape (32 q heads, 8 KV heads, head_dim 128)\n",
          f"Model dtype {str(DTYPE).replace('torch.', '')}, {LUT} signpost tables; measured device-to-device copy "
          f"bandwidth (read + write) {bw:.0f} GB/s. `us` = CUDA-graph replay (GPU time; speedup, GB/s and % use "
          "it), `us_eager` = plain Python calls (adds the launch overhead).\n",
          md_table(att, ["batch", "context", "method", "us", "us_eager", "speedup", "mbytes", "gbs", "pct_copy_bw",
                         "note"])]
    if app:
        md += ["\n## Append (quantize kernels: keys + values, 2 slots)\n",
               md_table(app, ["bits", "batch", "new_tokens", "us_per_call", "us_eager", "us_per_token"])]
    return "\n".join(md)


if __name__ == "__main__":
    main()
