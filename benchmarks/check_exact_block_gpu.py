"""GPU check and timing of the exact-block kernel (``kvquant_hf.kernels.exact_block.decode_prep``) and the fused RMSNorm.

1. Bit identity against the torch ops it replaces (``apply_rope`` on q and on the new keys in the model dtype, ``cat``
   of sink and new keys/values), fp16 and bf16, at the decode shapes of Llama-3-8B (32/8 heads, head_dim 128) and
   SmolLM2 (9/3, 64), batch 1 and 4, 1 new token and a 1024-token prefill chunk; plus the guard (NaN/Inf planted:
   zeroed in place and counted like ``zero_nonfinite_tokens_``).
2. Time of one layer's exact block, CUDA-graph replays (``triton.testing.do_bench_cudagraph`` medians): the session-5
   torch sequence (q RoPE, guard kernel, key RoPE, three ``cat`` and a ``ones`` for the mask, position
   ``index_copy``) vs the one kernel.
3. The opt-in fused RMSNorm (``kvquant_hf.kernels.rms_norm``, ``fused_norms=True``) against transformers'
   ``LlamaRMSNorm`` at hidden size 4096: elements that differ (the variance is summed in another order) and the
   time of one norm, CUDA-graph replay medians.

Usage (H200): ``PYTHONPATH=. python benchmarks/check_exact_block_gpu.py``
"""

from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from common import md_table, write_results

from kvquant_hf.layer_api import RopeContext, apply_rope
from kvquant_hf.kernels import decode_prep, zero_nonfinite_tokens_


def case(b, hq, h, n, s, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (3 * torch.randn(b, n, hq, d, device="cuda", generator=g)).to(dtype).transpose(1, 2)
    k = (3 * torch.randn(b, n, h, d, device="cuda", generator=g)).to(dtype).transpose(1, 2)
    v = torch.randn(b, n, h, d, device="cuda", generator=g).to(dtype).transpose(1, 2)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device="cuda") / d))
    pos = torch.arange(131072, 131072 + n, device="cuda").expand(b, n)
    cos, sin = RopeContext(None, None, inv_freq).cos_sin(pos, dtype)
    sk = torch.randn(b, h, s, d, device="cuda", generator=g).to(dtype)
    sv = torch.randn(b, h, s, d, device="cuda", generator=g).to(dtype)
    return q, k, v, cos, sin, sk, sv, pos


def time_case(dtype: torch.dtype, b: int) -> dict:
    q, k, v, cos, sin, sk, sv, pos = case(b, 32, 8, 1, 1, 128, dtype)
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    positions = torch.zeros(b, 1 << 20, dtype=torch.int32, device="cuda")
    length = torch.tensor([1000], dtype=torch.int32, device="cuda")
    valid = torch.ones(b, 1, dtype=torch.bool, device="cuda")

    def old():
        zero_nonfinite_tokens_(k, v, counter)
        qr = apply_rope(q, cos, sin)
        ek = torch.cat([sk, apply_rope(k, cos, sin)], 2)
        ev = torch.cat([sv, v], 2)
        mask = torch.cat([valid[:, None, :].expand(b, 1, 1), torch.ones(b, 1, 1, dtype=torch.bool, device="cuda")], -1)
        positions.index_copy_(1, length.long(), pos.to(torch.int32))
        return qr, ek, ev, mask

    def new():
        return decode_prep(q, k, v, cos, sin, sk, sv, counter=counter, positions=pos, positions_out=positions,
                           length_dev=length)

    t_old = triton.testing.do_bench_cudagraph(old, rep=50, return_mode="median") * 1e3
    t_new = triton.testing.do_bench_cudagraph(new, rep=50, return_mode="median") * 1e3
    row = {"dtype": str(dtype).split(".")[1], "B": b, "torch ops (us)": round(t_old, 2),
           "one kernel (us)": round(t_new, 2), "x32 layers saved (ms)": round(32 * (t_old - t_new) / 1e3, 3)}
    print(row, flush=True)
    return row


def norm_case(dtype: torch.dtype, n_rows: int) -> dict:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from kvquant_hf.kernels.rms_norm import rms_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    norm = LlamaRMSNorm(4096, eps=1e-5).cuda()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(4096, device="cuda", generator=g))
    norm = norm.to(dtype)
    x = (4 * torch.randn(n_rows, 1, 4096, device="cuda", generator=g)).to(dtype)
    with torch.no_grad():
        want = norm(x)
        got = rms_norm(x, norm.weight, norm.variance_epsilon)
        diff = (got.float() - want.float()).abs()
        rel = (diff / want.float().abs().clamp_min(1e-6)).max().item()
        t_old = triton.testing.do_bench_cudagraph(lambda: norm(x), rep=50, return_mode="median") * 1e3
        t_new = triton.testing.do_bench_cudagraph(lambda: rms_norm(x, norm.weight, norm.variance_epsilon), rep=50,
                                                  return_mode="median") * 1e3
    row = {"dtype": str(dtype).split(".")[1], "rows": n_rows, "elements differing": f"{(diff > 0).float().mean().item():.4%}",
           "max relative difference": f"{rel:.2e}", "LlamaRMSNorm (us)": round(t_old, 2),
           "fused (us)": round(t_new, 2), "x65 norms saved (ms)": round(65 * (t_old - t_new) / 1e3, 3)}
    print(row, flush=True)
    return row


def main():
    rows = []
    fails = 0
    shapes = [(1, 32, 8, 1, 1, 128), (4, 32, 8, 1, 4, 128), (1, 32, 8, 1024, 1, 128), (1, 9, 3, 1, 1, 64),
              (4, 9, 3, 1024, 1, 64)]
    for dtype in (torch.float16, torch.bfloat16):
        for b, hq, h, n, s, d in shapes:
            q, k, v, cos, sin, sk, sv, _ = case(b, hq, h, n, s, d, dtype)
            qr, ek, ev = decode_prep(q, k, v, cos, sin, sk, sv)
            ok = (torch.equal(qr, apply_rope(q, cos, sin)) and torch.equal(ek, torch.cat([sk, apply_rope(k, cos, sin)], 2))
                  and torch.equal(ev, torch.cat([sv, v], 2)))
            # guard: plant NaN/Inf, compare with the one-kernel guard + torch ops on a copy
            k2, v2 = k.clone(), v.clone()
            k2[0, h - 1, n - 1, d - 1] = float("nan")
            v2[b - 1, 0, 0, 0] = float("inf")
            k3, v3 = k2.clone(), v2.clone()
            c1 = torch.zeros(1, dtype=torch.int64, device="cuda")
            c2 = torch.zeros(1, dtype=torch.int64, device="cuda")
            zero_nonfinite_tokens_(k3, v3, c1)
            qr, ek, ev = decode_prep(q, k2, v2, cos, sin, sk, sv, counter=c2)
            guard_ok = (torch.equal(k2, k3) and torch.equal(v2, v3) and int(c1) == int(c2) > 0
                        and torch.equal(ek, torch.cat([sk, apply_rope(k3, cos, sin)], 2))
                        and torch.equal(ev, torch.cat([sv, v3], 2)))
            fails += not (ok and guard_ok)
            rows.append({"dtype": str(dtype).split(".")[1], "B": b, "Hq/H": f"{hq}/{h}", "L": n, "sink": s, "D": d,
                         "bit-identical": "yes" if ok else "NO", "guard identical": "yes" if guard_ok else "NO",
                         "bad tokens": int(c2)})
            print(rows[-1], flush=True)

    # timing: one layer's exact block at the Llama-3-8B decode shape
    trows = [time_case(dtype, b) for dtype in (torch.float16, torch.bfloat16) for b in (1, 4)]
    nrows = [norm_case(dtype, rows_) for dtype in (torch.float16, torch.bfloat16) for rows_ in (1, 4)]
    md = "\n".join([
        "# Exact-block kernel (`kvquant_hf.kernels.exact_block.decode_prep`): bit identity and time (H200)", "",
        "Command: `PYTHONPATH=. python benchmarks/check_exact_block_gpu.py`.", "",
        "## Bit identity against the torch ops (RoPE in the model dtype, cat, guard)", "",
        md_table(rows, list(rows[0])), "", f"FAILURES: {fails}", "",
        "## One layer's exact block, CUDA-graph replay medians (Llama-3-8B decode shape, 1 sink token)", "",
        md_table(trows, list(trows[0])), "",
        "## Fused RMSNorm vs LlamaRMSNorm (hidden 4096; time of one norm, CUDA-graph replay medians)", "",
        md_table(nrows, list(nrows[0])), "",
    ])
    write_results("check_exact_block_gpu", rows + trows + nrows, md, repo_and_out=True)
    print(f"FAILURES: {fails}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
