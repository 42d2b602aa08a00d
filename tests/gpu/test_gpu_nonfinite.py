"""The one-kernel non-finite guard inside the cache (policy ``nonfinite="zero"``, Triton backend): a prompt and a
decode step with NaN/Inf planted in some tokens give exactly what a clean run with those tokens zeroed (in every
head) gives, and the planted tokens are counted."""

from __future__ import annotations

import pytest
import torch

from kvquant_hf import KVQuantConfig
from kvquant_hf.cache import KVQuantLayer
from kvquant_hf.layer_api import AttendInputs, RopeContext, apply_rope

pytestmark = pytest.mark.gpu


def inputs(b, hq, h, n, pos0, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, n, d, device="cuda", generator=g).to(dtype)
    k = (torch.randn(b, h, n, d, device="cuda", generator=g) * 2).to(dtype)
    v = torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype)
    positions = torch.arange(pos0, pos0 + n, device="cuda").expand(b, n)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device="cuda") / d))
    rope = RopeContext(cos=None, sin=None, inv_freq=inv_freq)
    rope.cos, rope.sin = rope.cos_sin(positions, dtype)
    return AttendInputs(apply_rope(q, rope.cos, rope.sin), k, v, positions, rope, None, d ** -0.5, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_nonfinite_tokens_zeroed_and_counted(dtype):
    cfg = KVQuantConfig(bits=4, sink_tokens=1, nonfinite="zero", backend="triton")
    clean, dirty = KVQuantLayer(cfg, 0), KVQuantLayer(cfg, 0)
    a, bb = inputs(2, 8, 2, 300, 0, 128, dtype, 0), inputs(2, 8, 2, 300, 0, 128, dtype, 0)
    bb.key[0, 1, 40, 3] = float("nan")
    bb.value[1, 0, 100, :] = float("inf")
    for row, t in ((0, 40), (1, 100)):
        a.key[row, :, t] = 0
        a.value[row, :, t] = 0
    assert torch.equal(clean.attend(a), dirty.attend(bb))
    sa, sb = inputs(2, 8, 2, 1, 300, 128, dtype, 5), inputs(2, 8, 2, 1, 300, 128, dtype, 5)
    sb.value[1, 1, 0, 7] = float("-inf")
    sa.key[1, :, 0] = 0
    sa.value[1, :, 0] = 0
    out_c, out_d = clean.attend(sa), dirty.attend(sb)
    assert torch.equal(out_c, out_d)
    assert torch.isfinite(out_d).all()
    assert dirty.n_nonfinite == 3 and clean.n_nonfinite == 0
