"""The opt-in fusions on a GPU: ``silu_mul`` (``fused_projections``), the residual add + RMSNorm kernel
(``fused_norms``), one GEMV for q/k/v and gate/up, and the whole model with both fusions (eager and CUDA graph).

The fused kernels round in another order than torch, so a few elements may differ in the last bit; the whole-model
check asks for the same first greedy token (clear top-2 margin), a small first-step logit difference, and equal
tokens between the fused eager run and the fused CUDA-graph run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import random_model
from kvquant_hf.kernels.silu_mul import silu_mul

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 4])
def test_silu_mul_matches_torch(dtype, rows, inter=14336):
    g = torch.Generator(device="cuda").manual_seed(rows)
    gu = (3 * torch.randn(rows, 2 * inter, device="cuda", generator=g)).to(dtype)
    gate, up = gu.split(inter, dim=-1)
    want = (F.silu(gate) * up).float()
    got = silu_mul(gu).float()
    assert (got != want).float().mean().item() < 1e-3
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 4])
def test_add_rms_norm_matches_torch(dtype, rows, n=4096):
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
        y_want = norm(s_want).float()
        s, y = add_rms_norm(r, x, norm.weight, norm.variance_epsilon)
    assert torch.equal(s, s_want)
    rel = ((y.float() - y_want).abs() / y_want.abs().clamp_min(1e-3)).max().item()
    assert rel < 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("outs", [(4096, 1024, 1024), (14336, 14336)], ids=["qkv", "gate_up"])
def test_one_gemv_equals_separate_projections(dtype, outs, hidden=4096):
    g = torch.Generator(device="cuda").manual_seed(len(outs))
    ws = [(torch.randn(o, hidden, device="cuda", generator=g) / hidden ** 0.5).to(dtype) for o in outs]
    x = torch.randn(1, 1, hidden, device="cuda", generator=g).to(dtype)
    sep = torch.cat([F.linear(x, wi) for wi in ws], -1).float()
    fused = F.linear(x, torch.cat(ws)).float()
    assert (fused - sep).abs().max().item() < 0.05  # the GEMM library may split K differently


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_with_both_fusions(dtype):
    from kvquant_hf.models import unpatch_model

    model = random_model("llama3-8b", dtype=dtype, num_layers=4)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, model.config.vocab_size, (1, 64), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    kw = dict(max_new_tokens=16, do_sample=False, cache_implementation="kvquant", output_scores=True,
              return_dict_in_generate=True)
    try:
        with torch.inference_mode():
            plain = model.generate(ids, cache_config={"bits": 4, "fused_norms": True}, **kw)
            fused = model.generate(ids, cache_config={"bits": 4, "fused_norms": True, "fused_projections": True},
                                   **kw)
            graph = model.generate(ids, cache_config={"bits": 4, "fused_norms": True, "fused_projections": True,
                                                      "cuda_graph": True}, **kw)
    finally:
        unpatch_model(model)
    first_plain, first_fused = plain.scores[0].float(), fused.scores[0].float()
    margin = first_plain.topk(2).values.diff().abs().item()
    diff = (first_plain - first_fused).abs().max().item()
    assert diff < 0.25 and diff < margin / 2
    assert torch.equal(first_plain.argmax(-1), first_fused.argmax(-1))
    assert torch.equal(fused.sequences, graph.sequences)  # the CUDA-graph replay decodes what eager decodes
