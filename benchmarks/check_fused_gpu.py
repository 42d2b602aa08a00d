"""GPU check and timing of the opt-in ``fused_projections`` (``kvquant_hf.models.projections``).

1. ``kvquant_hf.kernels.silu_mul.silu_mul`` against transformers' ``act_fn(gate) * up`` (torch ``silu`` then multiply):
   elements that differ, and the time of one call vs the two torch kernels, at the Llama-3-8B MLP width (14336),
   1 and 4 rows, fp16 and bf16.
2. One GEMV for q/k/v (and for gate/up) vs three (two) separate ``F.linear`` calls at the Llama-3-8B decode shape
   (batch 1 row): time, and the largest difference of the outputs (the GEMM library may pick another split-K).
3. The whole model: a random Llama-3-8B-shaped model (4 layers, bf16 and fp16), greedy ``generate`` with the
   KVQuantCache for 16 tokens with and without ``fused_projections`` (both with ``fused_norms``): tokens equal, and
   the largest logit difference at the first step; and the fused run again with ``cuda_graph=True`` (the user-facing
   path: generate, graph capture, both fusions).

Times are ``triton.testing.do_bench_cudagraph`` medians (CUDA-graph replays, as in a graph decode step).

Usage (H200): ``PYTHONPATH=. python benchmarks/check_fused_gpu.py [RESULT_NAME]``
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(__file__))
from common import md_table, random_model, write_results

from kvquant_hf.kernels.silu_mul import silu_mul


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def silu_case(dtype, rows: int, inter: int = 14336) -> dict:
    g = torch.Generator(device="cuda").manual_seed(rows)
    gu = (3 * torch.randn(rows, 2 * inter, device="cuda", generator=g)).to(dtype)
    gate, up = gu.split(inter, dim=-1)
    want = F.silu(gate) * up
    got = silu_mul(gu)
    differ = int((got != want).sum())
    t_old = bench(lambda: F.silu(gate) * up)
    t_new = bench(lambda: silu_mul(gu))
    return {"dtype": str(dtype).split(".")[1], "rows": rows, "elements differing": differ,
            "torch silu + mul (us)": round(t_old, 2), "silu_mul (us)": round(t_new, 2)}


def add_norm_case(dtype, rows: int, n: int = 4096) -> dict:
    """The decoder layer's residual add + post-attention RMSNorm (fused_norms) vs torch's add and LlamaRMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from kvquant_hf.kernels.rms_norm import add_rms_norm

    g = torch.Generator(device="cuda").manual_seed(rows)
    norm = LlamaRMSNorm(n, eps=1e-5).cuda()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(n, device="cuda", generator=g))
    norm = norm.to(dtype)
    r = (4 * torch.randn(rows, n, device="cuda", generator=g)).to(dtype)
    x = (2 * torch.randn(rows, n, device="cuda", generator=g)).to(dtype)
    with torch.no_grad():
        s_want = r + x
        y_want = norm(s_want)
        s, y = add_rms_norm(r, x, norm.weight, norm.variance_epsilon)
        t_old = bench(lambda: norm(r + x))
        t_new = bench(lambda: add_rms_norm(r, x, norm.weight, norm.variance_epsilon))
    return {"dtype": str(dtype).split(".")[1], "rows": rows, "sum identical": bool(torch.equal(s, s_want)),
            "normed elements differing": int((y != y_want).sum()),
            "max rel. difference": float(((y.float() - y_want.float()).abs() / y_want.float().abs().clamp_min(1e-3)).max()),
            "add + LlamaRMSNorm (us)": round(t_old, 2), "add_rms_norm (us)": round(t_new, 2)}


def gemv_case(dtype, name: str, outs: tuple[int, ...], hidden: int = 4096) -> dict:
    g = torch.Generator(device="cuda").manual_seed(len(outs))
    ws = [(torch.randn(o, hidden, device="cuda", generator=g) / hidden ** 0.5).to(dtype) for o in outs]
    w = torch.cat(ws)
    x = torch.randn(1, 1, hidden, device="cuda", generator=g).to(dtype)
    sep = torch.cat([F.linear(x, wi) for wi in ws], -1)
    fused = F.linear(x, w)
    t_old = bench(lambda: [F.linear(x, wi) for wi in ws])
    t_new = bench(lambda: F.linear(x, w))
    return {"dtype": str(dtype).split(".")[1], "projection": name, "separate (us)": round(t_old, 2),
            "fused (us)": round(t_new, 2), "x32 layers saved (ms)": round(32 * (t_old - t_new) / 1e3, 3),
            "max |fused - separate|": float((fused.float() - sep.float()).abs().max()),
            "elements differing": int((fused != sep).sum())}


def model_case(dtype) -> dict:
    from kvquant_hf.models import unpatch_model

    model = random_model("llama3-8b", dtype=dtype, num_layers=4)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, model.config.vocab_size, (1, 64), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    kw = dict(max_new_tokens=16, do_sample=False, cache_implementation="kvquant", output_scores=True,
              return_dict_in_generate=True)
    with torch.inference_mode():
        plain = model.generate(ids, cache_config={"bits": 4, "fused_norms": True}, **kw)
        fused = model.generate(ids, cache_config={"bits": 4, "fused_norms": True, "fused_projections": True}, **kw)
        graph = model.generate(ids, cache_config={"bits": 4, "fused_norms": True, "fused_projections": True,
                                                  "cuda_graph": True}, **kw)
    unpatch_model(model)
    a, b, c = plain.sequences[0, 64:], fused.sequences[0, 64:], graph.sequences[0, 64:]
    return {"dtype": str(dtype).split(".")[1], "greedy tokens equal (of 16)": int((a == b).cumprod(0).sum()),
            "first-step max |logit diff|": float((plain.scores[0].float() - fused.scores[0].float()).abs().max()),
            "first-step top-2 margin": float(plain.scores[0].float().topk(2).values.diff().abs().item()),
            "fused + cuda_graph vs fused eager: tokens equal (of 16)": int((b == c).cumprod(0).sum())}


NAME = sys.argv[1] if len(sys.argv) > 1 else "check_fused_gpu"


def main():
    srows = [silu_case(dt, r) for dt in (torch.float16, torch.bfloat16) for r in (1, 4)]
    for r in srows:
        print(r, flush=True)
    arows = [add_norm_case(dt, r) for dt in (torch.float16, torch.bfloat16) for r in (1, 4)]
    for r in arows:
        print(r, flush=True)
    grows = [gemv_case(dt, name, outs) for dt in (torch.bfloat16, torch.float16)
             for name, outs in (("q|k|v", (4096, 1024, 1024)), ("gate|up", (14336, 14336)))]
    for r in grows:
        print(r, flush=True)
    mrows = [model_case(dt) for dt in (torch.bfloat16, torch.float16)]
    for r in mrows:
        print(r, flush=True)
    md = "\n".join([
        "# fused_projections on the H200: SiLU·mul kernel, fused GEMVs, whole-model check", "",
        f"Command: `PYTHONPATH=. python benchmarks/check_fused_gpu.py {' '.join(sys.argv[1:])}`.", "",
        "## silu_mul vs torch silu + multiply (CUDA-graph replay medians)", "", md_table(srows, list(srows[0])), "",
        "## Residual add + RMSNorm in one kernel (fused_norms, hidden 4096) vs torch add + LlamaRMSNorm", "",
        md_table(arows, list(arows[0])), "",
        "## One GEMV vs separate projections (Llama-3-8B, one row)", "", md_table(grows, list(grows[0])), "",
        "## Random Llama-3-8B-shaped model, 4 layers: greedy generate with and without fused_projections", "",
        md_table(mrows, list(mrows[0])), "",
    ])
    print(write_results(NAME, srows + arows + grows + mrows, md, repo_and_out=True))


if __name__ == "__main__":
    main()
