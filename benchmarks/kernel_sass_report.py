"""Compile the stage-1 packed-attention kernel for sm_90 on a machine without a GPU and summarize its SASS.

Registers, stack (spills), shared memory and an instruction histogram per config, using the ptxas and
cuobjdump bundled with the `triton` wheel: no device time needed to see what a change does to the code.
Shapes are the Llama-3-8B benchmark's (H=8, D=128, 128K tokens); integer arguments get Triton's usual
specializations (==1 -> constexpr, %16 -> divisibility). Output: one line per config; the last config's
SASS and TTGIR are left in /tmp/k.sass and /tmp/k.ttgir.

Usage: ``python benchmarks/kernel_sass_report.py '[{"bits": 4, "num_warps": 4, "block_n": 32}]'``; the decode fast path
(``_packed_decode_kernel``) with ``{"kernel": "decode", "bits": 4, "affine": true, ...}``. ``loop`` counts the SASS
instructions of the main loop, ``fast-path`` leaves out the exact-RoPE arm (non-consecutive positions), and
``/elem`` divides the fast path by the K+V elements one thread dequantizes per iteration (2*block_n*D/threads).
"""

import json
import os
import re
import subprocess
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton
from triton.backends.compiler import GPUTarget

from kvquant_hf.kernels import decode_attention as da

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
HISTOGRAM = ["LDG", "LDS", "STS", "LDL", "STL", "HMMA", "MUFU", "IMAD", "LOP3", "FFMA", "FMUL", "FSEL", "ISETP",
             "PRMT", "SHF", "F2FP", "BAR", "SHFL"]


def compile_split(bits=4, dt="fp16", block_n=32, num_warps=4, num_stages=1, slots=2, rope_table=True, group=4,
                  fast=True, maxnreg=None, length=131072, h=8, d=128):
    """``triton.compile`` the stage-1 kernel for sm_90 with the benchmark's strides."""
    fn = da._packed_attn_split_kernel
    cap = length
    nb = d * bits // 8
    vals = dict(L=length, LQ=1, H=h, NUM_MB=1, NUM_SPLITS=33, window=0,
                stride_qb=32 * d, stride_qh=d, stride_ql=d, stride_qd=1,
                stride_kcb=h * cap * nb, stride_kch=cap * nb, stride_kct=nb,
                stride_kvb=h * cap * slots, stride_kvh=cap * slots, stride_kvt=slots,
                stride_kib=h * cap * slots, stride_kih=cap * slots, stride_kit=slots,
                stride_vcb=h * cap * nb, stride_vch=cap * nb, stride_vct=nb,
                stride_vsb=h * cap, stride_vsh=cap, stride_vst=1,
                stride_vzb=h * cap, stride_vzh=cap, stride_vzt=1,
                stride_vvb=h * cap * slots, stride_vvh=cap * slots, stride_vvt=slots,
                stride_vib=h * cap * slots, stride_vih=cap * slots, stride_vit=slots,
                stride_pb=cap, stride_pt=1, stride_qpb=0, stride_qpl=0)
    ptrs = {"q_ptr": dt, "kc_ptr": "u8", "kov_ptr": dt, "koi_ptr": "u8", "vc_ptr": "u8", "vs_ptr": dt,
            "vz_ptr": dt, "vov_ptr": dt, "voi_ptr": "u8", "pos_ptr": "i32", "hist_ptr": "i32", "qpos_ptr": "i32",
            "len_ptr": "i32", "kpair_ptr": "i32", "vpair_ptr": "i32"}
    cx = dict(HEAD_DIM=d, GROUP=group, K_BITS=bits, V_BITS=bits, K_SLOTS=slots, V_SLOTS=slots, BLOCK_M=16,
              BLOCK_N=block_n, HAS_HIST=False, HAS_WINDOW=False, ROPE_TABLE=rope_table, USE_DOT=True,
              DOT_F32=dt != "fp16", IEEE=False, FAST=fast, LEN_ON_DEVICE=False)
    return _compile(fn, vals, ptrs, cx, num_warps, num_stages, maxnreg)


def _loop_stats(sass: str):
    """Instructions of the main loop (largest backward branch) and of its fast path.

    The fast path leaves out the larger-MUFU arm of each if/else inside the loop (the exact-RoPE arm for
    blocks whose positions are not consecutive): ``loop - slow arm``.
    """
    ins = [(int(a, 16), op) for a, op in
           re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^\n]*", sass)]
    bras = [(int(a, 16), int(t, 16)) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+0x([0-9a-f]+)", sass)]
    back = [(a, t) for a, t in bras if t < a]
    if not back:
        return None
    end, start = max(back, key=lambda x: x[0] - x[1])
    body = [(a, op) for a, op in ins if start <= a <= end]
    slow = 0
    # unconditional forward BRA at u -> x inside the loop: arms (c, u] and (u, x) of an if/else
    for a, t in bras:
        if start < a < end and t > a and t <= end:
            line = re.search(rf"/\*{a:04x}\*/\s+(@!?U?P\w+\s+)?BRA", sass)
            if line and line.group(1):
                continue
            arm2 = [op for x, op in body if a < x < t]
            conds = [c for c, tt in bras if start < c < a and tt == a + 16]
            arm1 = [op for x, op in body if conds and conds[-1] < x <= a]
            slow += len(max((arm1, arm2), key=lambda arm: (arm.count("MUFU"), len(arm))))
    return len(body), len(body) - slow


def compile_decode(bits=4, block_n=32, num_warps=4, num_stages=1, slots=2, v_slots=None, group=4, fast=True, maxnreg=None,
                   affine=True, length=131072, h=8, d=128, hist=False, prefetch=True, sparse=False, key_f32=True,
                   bf16=False):
    """``triton.compile`` the decode fast-path kernel (:func:`_packed_decode_kernel`) for sm_90."""
    fn = da._packed_decode_kernel
    cap = length
    nb = d * bits // 8
    vals = dict(L=length, LQ=1, H=h, NUM_SPLITS=33,
                stride_qb=32 * d, stride_qh=d, stride_ql=d,
                stride_kcb=h * cap * nb // 4, stride_kch=cap * nb // 4, stride_kct=nb // 4,
                stride_kvb=h * cap * slots, stride_kvh=cap * slots, stride_kvt=slots,
                stride_kib=h * cap * slots, stride_kih=cap * slots, stride_kit=slots,
                stride_vcb=h * cap * nb // 4, stride_vch=cap * nb // 4, stride_vct=nb // 4,
                stride_vsb=h * cap, stride_vsh=cap, stride_vst=1,
                stride_vzb=h * cap, stride_vzh=cap, stride_vzt=1,
                stride_vvb=h * cap * slots, stride_vvh=cap * slots, stride_vvt=slots,
                stride_vib=h * cap * slots, stride_vih=cap * slots, stride_vit=slots,
                stride_pb=cap)
    ft = "bf16" if bf16 else "fp16"
    ptrs = {"q_ptr": ft, "kc_ptr": "u8", "kov_ptr": ft, "koi_ptr": "u8", "vc_ptr": "u8", "vs_ptr": ft,
            "vz_ptr": ft, "vov_ptr": ft, "voi_ptr": "u8", "pos_ptr": "i32", "hist_ptr": "i32",
            "len_ptr": "i32", "kpair_ptr": "i32", "vpair_ptr": "i32"}
    cx = dict(HEAD_DIM=d, GROUP=group, K_BITS=bits, V_BITS=bits, K_SLOTS=slots, PREFETCH=prefetch, K_SPARSE=sparse and slots > 0, KEY_F32=key_f32,
              V_SLOTS=slots if v_slots is None else v_slots, K_AFFINE=affine,
              V_AFFINE=affine, BLOCK_M=16, BLOCK_N=block_n, HAS_HIST=hist, FAST=fast, LEN_ON_DEVICE=False,
              BF16=bf16)
    return _compile(fn, vals, ptrs, cx, num_warps, num_stages, maxnreg)


def _compile(fn, vals, ptrs, cx, num_warps, num_stages, maxnreg):
    sig, attrs, consts = {}, {}, dict(cx)
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptrs.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "k_a", "k_b", "v_a", "v_b"):
            sig[name] = "fp32"
        elif vals[name] == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if vals[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def summarize(kernel, tag: str, elems_per_thread: float | None = None) -> str:
    """Registers, stack, shared memory and an instruction histogram of a compiled kernel."""
    with open("/tmp/k.cubin", "wb") as fh:
        fh.write(kernel.asm["cubin"])
    with open("/tmp/k.ttgir", "w") as fh:
        fh.write(kernel.asm["ttgir"])
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", "/tmp/k.cubin"], capture_output=True,
                          text=True, check=False).stdout
    with open("/tmp/k.sass", "w") as fh:
        fh.write(sass)
    res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", "/tmp/k.cubin"], capture_output=True,
                         text=True, check=False).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", res)
    ops = Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    hist = " ".join(f"{k}={ops.get(k, 0)}" for k in HISTOGRAM)
    loop = _loop_stats(sass)
    per = ""
    if loop:
        per = f" loop {loop[0]} fast-path {loop[1]}"
        if elems_per_thread:
            per += f" ({loop[1] / elems_per_thread:.2f}/elem)"
    return (f"{tag} regs {usage.group(1)} stack {usage.group(2)} smem {kernel.metadata.shared} "
            f"instructions {sum(ops.values())}{per} {hist}")


if __name__ == "__main__":
    for kw in json.loads(sys.argv[1] if len(sys.argv) > 1 else '[{"bits": 4}]'):
        bn, nw, d = kw.get("block_n", 32), kw.get("num_warps", 4), kw.get("d", 128)
        kind = kw.pop("kernel", "split")
        comp = compile_decode if kind == "decode" else compile_split
        print(summarize(comp(**kw), kind + " " + json.dumps(kw), 2 * bn * d / (32 * nw)), flush=True)
