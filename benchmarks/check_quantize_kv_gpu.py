"""GPU check and timing of the one-launch append (``kvquant_hf.kernels.quantize.quantize_kv_triton``).

1. Bit identity: keys and values quantized in one launch vs the two separate kernels (``quantize_keys_triton`` /
   ``quantize_values_triton``) and vs the torch reference (``kvquant_hf.quant``), fp16 and bf16, 2/3/4 bits, 1 and
   2 outlier slots, 1 / 7 / 1024 new tokens, Llama-3-8B (8 KV heads, head_dim 128) and SmolLM2 (3, 64) shapes,
   device-side start (CUDA-graph decode) and host start.
2. Time of one decode append (1 token, batch 1, Llama-3-8B shape), CUDA-graph replay medians: two launches vs one.

Usage (H200): ``PYTHONPATH=. python benchmarks/check_quantize_kv_gpu.py``
"""

from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from common import md_table, write_results

from kvquant_hf import quant
from kvquant_hf.kernels.quantize import quantize_keys_triton, quantize_kv_triton, quantize_values_triton


def dests(b, h, cap, d, bits, slots, dtype):
    sd = quant.value_scale_dtype(dtype)
    z = dict(device="cuda")
    kd = (torch.zeros(b, h, cap, d * bits // 8, dtype=torch.uint8, **z), torch.zeros(b, h, cap, slots, dtype=dtype, **z),
          torch.zeros(b, h, cap, slots, dtype=torch.uint8, **z))
    vd = (torch.zeros(b, h, cap, d * bits // 8, dtype=torch.uint8, **z), torch.zeros(b, h, cap, dtype=sd, **z),
          torch.zeros(b, h, cap, dtype=sd, **z), torch.zeros(b, h, cap, slots, dtype=dtype, **z),
          torch.zeros(b, h, cap, slots, dtype=torch.uint8, **z))
    return kd, vd


def inputs(b, h, s, d, bits, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = (2 * torch.randn(b, h, s, d, device="cuda", generator=g)).to(dtype)
    v = (3 * torch.randn(b, h, s, d, device="cuda", generator=g)).to(dtype)
    lo, hi = quant.key_thresholds_from_sample(2 * torch.randn(b, h, 256, d, device="cuda", generator=g), 0.02)
    lut = quant.normal_float_signposts(bits).cuda()
    return k, v, lo.contiguous(), hi.contiguous(), lut


def case(dtype, bits, slots, s, h, d, device_start) -> dict:
    b, cap, start = 1 if s > 1 else 2, s + 16, 5
    k, v, lo, hi, lut = inputs(b, h, s, d, bits, dtype, seed=bits * 100 + s)
    st = torch.tensor([start], dtype=torch.int32, device="cuda") if device_start else start
    kd1, vd1 = dests(b, h, cap, d, bits, slots, dtype)
    kd2, vd2 = dests(b, h, cap, d, bits, slots, dtype)
    c1 = torch.zeros(1, dtype=torch.int32, device="cuda")
    c2 = torch.zeros(1, dtype=torch.int32, device="cuda")
    quantize_keys_triton(k, lut, lo, hi, slots, bits, out=kd1, start=st, clip_counter=c1)
    quantize_values_triton(v, lut, slots, bits, out=vd1, start=st)
    quantize_kv_triton(k, v, lut, lo, hi, lut, slots, bits, bits, k_out=kd2, v_out=vd2, start=st, clip_counter=c2)
    same = all(torch.equal(a, b_) for a, b_ in zip(kd1 + vd1, kd2 + vd2)) and int(c1) == int(c2)
    rk = quant.quantize_keys(k, lut, lo, hi, slots, bits)
    rv = quant.quantize_values(v, lut, slots, bits)
    sl = slice(start, start + s)
    ref = (torch.equal(kd2[0][:, :, sl], rk.codes) and torch.equal(kd2[1][:, :, sl], rk.out_val)
           and torch.equal(kd2[2][:, :, sl], rk.out_idx) and torch.equal(vd2[0][:, :, sl], rv.codes)
           and torch.equal(vd2[1][:, :, sl], rv.scale) and torch.equal(vd2[2][:, :, sl], rv.zero)
           and torch.equal(vd2[3][:, :, sl], rv.out_val) and torch.equal(vd2[4][:, :, sl], rv.out_idx))
    return {"dtype": str(dtype).split(".")[1], "bits": bits, "slots": slots, "tokens": s, "H/D": f"{h}/{d}",
            "device start": device_start, "one launch == two": "yes" if same else "NO",
            "== torch reference": "yes" if ref else "NO"}


def timing(dtype) -> dict:
    h, d, bits, slots = 8, 128, 4, 2
    k, v, lo, hi, lut = inputs(1, h, 1, d, bits, dtype, seed=1)
    kd, vd = dests(1, h, 64, d, bits, slots, dtype)
    st = torch.tensor([7], dtype=torch.int32, device="cuda")
    kz = (hi * 0.5 + lo * 0.5).contiguous()
    ks = (hi * 0.5 - lo * 0.5).clamp_min(quant.MIN_SCALE).contiguous()
    c = torch.zeros(1, dtype=torch.int32, device="cuda")

    def two():
        quantize_keys_triton(k, lut, lo, hi, slots, bits, out=kd, start=st, k_zero=kz, k_scale=ks, clip_counter=c)
        quantize_values_triton(v, lut, slots, bits, out=vd, start=st)

    def one():
        quantize_kv_triton(k, v, lut, lo, hi, lut, slots, bits, bits, k_out=kd, v_out=vd, start=st, k_zero=kz,
                           k_scale=ks, clip_counter=c)

    t2 = triton.testing.do_bench_cudagraph(two, rep=50, return_mode="median") * 1e3
    t1 = triton.testing.do_bench_cudagraph(one, rep=50, return_mode="median") * 1e3
    return {"dtype": str(dtype).split(".")[1], "two launches (us)": round(t2, 2), "one launch (us)": round(t1, 2),
            "x32 layers saved (ms)": round(32 * (t2 - t1) / 1e3, 3)}


def main():
    rows, fails = [], 0
    for dtype in (torch.float16, torch.bfloat16):
        for bits in (2, 3, 4):
            for slots, s, h, d, dev in ((2, 1, 8, 128, True), (1, 7, 3, 64, False), (2, 1024, 8, 128, False),
                                        (1, 1, 3, 64, True)):
                r = case(dtype, bits, slots, s, h, d, dev)
                fails += r["one launch == two"] != "yes" or r["== torch reference"] != "yes"
                rows.append(r)
                print(r, flush=True)
    trows = [timing(dt) for dt in (torch.float16, torch.bfloat16)]
    for r in trows:
        print(r, flush=True)
    print(f"FAILURES: {fails}")
    md = "\n".join([
        "# One-launch append (`quantize_kv_triton`): bit identity and time (H200)", "",
        "Command: `PYTHONPATH=. python benchmarks/check_quantize_kv_gpu.py`.", "",
        md_table(rows, list(rows[0])), "", f"FAILURES: {fails}", "",
        "## One decode append (1 token, batch 1, 8 KV heads, head_dim 128, nuq4, 2 slots), CUDA-graph replay medians",
        "", md_table(trows, list(trows[0])), "",
    ])
    print(write_results("check_quantize_kv_gpu", rows + trows, md, repo_and_out=True))


if __name__ == "__main__":
    main()
