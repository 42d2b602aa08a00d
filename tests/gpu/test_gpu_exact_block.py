"""The exact-block kernel (``kvquant_hf.kernels.decode_prep``) and the fused RMSNorm on a GPU.

1. Bit identity against the torch ops it replaces (``apply_rope`` on q and on the new keys in the model dtype, ``cat``
   of sink and new keys/values), fp16 and bf16, at the decode shapes of Llama-3-8B (32/8 heads, head_dim 128) and
   SmolLM2 (9/3, 64), batch 1 and 4, 1 new token and a 1024-token prefill chunk; plus the non-finite guard (NaN/Inf
   planted: zeroed in place and counted like ``zero_nonfinite_tokens_``).
2. The fused RMSNorm (``kvquant_hf.kernels.rms_norm``, ``fused_norms=True``) against transformers' ``LlamaRMSNorm`` at
   hidden size 4096: the variance is summed in another order, so elements may differ in the last bit only.
"""

from __future__ import annotations

import pytest
import torch

from kvquant_hf.kernels import decode_prep, zero_nonfinite_tokens_
from kvquant_hf.layer_api import RopeContext, apply_rope

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
SHAPES = [(1, 32, 8, 1, 1, 128), (4, 32, 8, 1, 4, 128), (1, 32, 8, 1024, 1, 128), (1, 9, 3, 1, 1, 64),
          (4, 9, 3, 1024, 1, 64)]


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
    return q, k, v, cos, sin, sk, sv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_prep_bit_identical_to_torch_ops(dtype, shape):
    b, hq, h, n, s, d = shape
    q, k, v, cos, sin, sk, sv = case(b, hq, h, n, s, d, dtype)
    qr, ek, ev = decode_prep(q, k, v, cos, sin, sk, sv)
    assert torch.equal(qr, apply_rope(q, cos, sin))
    assert torch.equal(ek, torch.cat([sk, apply_rope(k, cos, sin)], 2))
    assert torch.equal(ev, torch.cat([sv, v], 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_prep_guard_equals_the_guard_kernel(dtype, shape):
    b, hq, h, n, s, d = shape
    q, k, v, cos, sin, sk, sv = case(b, hq, h, n, s, d, dtype)
    k2, v2 = k.clone(), v.clone()
    k2[0, h - 1, n - 1, d - 1] = float("nan")
    v2[b - 1, 0, 0, 0] = float("inf")
    k3, v3 = k2.clone(), v2.clone()
    c1 = torch.zeros(1, dtype=torch.int64, device="cuda")
    c2 = torch.zeros(1, dtype=torch.int64, device="cuda")
    zero_nonfinite_tokens_(k3, v3, c1)
    _qr, ek, ev = decode_prep(q, k2, v2, cos, sin, sk, sv, counter=c2)
    assert torch.equal(k2, k3) and torch.equal(v2, v3)
    assert int(c1) == int(c2) > 0
    assert torch.equal(ek, torch.cat([sk, apply_rope(k3, cos, sin)], 2))
    assert torch.equal(ev, torch.cat([sv, v3], 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_rows", [1, 4])
def test_fused_rms_norm_matches_llama_rms_norm(dtype, n_rows):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from kvquant_hf.kernels.rms_norm import rms_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    norm = LlamaRMSNorm(4096, eps=1e-5).cuda()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(4096, device="cuda", generator=g))
    norm = norm.to(dtype)
    x = (4 * torch.randn(n_rows, 1, 4096, device="cuda", generator=g)).to(dtype)
    with torch.no_grad():
        want = norm(x).float()
        got = rms_norm(x, norm.weight, norm.variance_epsilon).float()
    rel = ((got - want).abs() / want.abs().clamp_min(1e-6)).max().item()
    assert rel < 1e-2  # one rounding step of the model dtype at most
    assert (got != want).float().mean().item() < 0.01
