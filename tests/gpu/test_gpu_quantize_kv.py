"""The one-launch append (``kvquant_hf.kernels.quantize.quantize_kv_triton``): keys and values quantized in one launch
equal the two separate kernels (``quantize_keys_triton`` / ``quantize_values_triton``) and the torch reference
(``kvquant_hf.quant``) bit for bit: fp16 and bf16, 2/3/4 bits, 1 and 2 outlier slots, 1 / 7 / 1024 new tokens,
Llama-3-8B (8 KV heads, head_dim 128) and SmolLM2 (3, 64) shapes, device-side start (CUDA-graph decode) and host
start."""

from __future__ import annotations

import pytest
import torch

from kvquant_hf import quant
from kvquant_hf.kernels.quantize import quantize_keys_triton, quantize_kv_triton, quantize_values_triton

pytestmark = pytest.mark.gpu


def dests(b, h, cap, d, bits, slots, dtype):
    sd = quant.value_scale_dtype(dtype)
    z = dict(device="cuda")
    kd = (torch.zeros(b, h, cap, d * bits // 8, dtype=torch.uint8, **z),
          torch.zeros(b, h, cap, slots, dtype=dtype, **z), torch.zeros(b, h, cap, slots, dtype=torch.uint8, **z))
    vd = (torch.zeros(b, h, cap, d * bits // 8, dtype=torch.uint8, **z), torch.zeros(b, h, cap, dtype=sd, **z),
          torch.zeros(b, h, cap, dtype=sd, **z), torch.zeros(b, h, cap, slots, dtype=dtype, **z),
          torch.zeros(b, h, cap, slots, dtype=torch.uint8, **z))
    return kd, vd


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("slots,s,h,d,device_start",
                         [(2, 1, 8, 128, True), (1, 7, 3, 64, False), (2, 1024, 8, 128, False), (1, 1, 3, 64, True)])
def test_one_launch_equals_two_and_reference(dtype, bits, slots, s, h, d, device_start):
    b, cap, start = 1 if s > 1 else 2, s + 16, 5
    g = torch.Generator(device="cuda").manual_seed(bits * 100 + s)
    k = (2 * torch.randn(b, h, s, d, device="cuda", generator=g)).to(dtype)
    v = (3 * torch.randn(b, h, s, d, device="cuda", generator=g)).to(dtype)
    lo, hi = quant.key_thresholds_from_sample(2 * torch.randn(b, h, 256, d, device="cuda", generator=g), 0.02)
    lo, hi = lo.contiguous(), hi.contiguous()
    lut = quant.normal_float_signposts(bits).cuda()
    st = torch.tensor([start], dtype=torch.int32, device="cuda") if device_start else start
    kd1, vd1 = dests(b, h, cap, d, bits, slots, dtype)
    kd2, vd2 = dests(b, h, cap, d, bits, slots, dtype)
    c1 = torch.zeros(1, dtype=torch.int32, device="cuda")
    c2 = torch.zeros(1, dtype=torch.int32, device="cuda")
    quantize_keys_triton(k, lut, lo, hi, slots, bits, out=kd1, start=st, clip_counter=c1)
    quantize_values_triton(v, lut, slots, bits, out=vd1, start=st)
    quantize_kv_triton(k, v, lut, lo, hi, lut, slots, bits, bits, k_out=kd2, v_out=vd2, start=st, clip_counter=c2)
    for i, (a, b_) in enumerate(zip(kd1 + vd1, kd2 + vd2)):
        assert torch.equal(a, b_), f"output {i}: one launch != two"
    assert int(c1) == int(c2)
    rk = quant.quantize_keys(k, lut, lo, hi, slots, bits)
    rv = quant.quantize_values(v, lut, slots, bits)
    sl = slice(start, start + s)
    got = (kd2[0], kd2[1], kd2[2], vd2[0], vd2[1], vd2[2], vd2[3], vd2[4])
    want = (rk.codes, rk.out_val, rk.out_idx, rv.codes, rv.scale, rv.zero, rv.out_val, rv.out_idx)
    for i, (a, w) in enumerate(zip(got, want)):
        assert torch.equal(a[:, :, sl], w), f"output {i}: != torch reference"
