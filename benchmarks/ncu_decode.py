"""One call of the CUDA decode kernel at 128K (Llama-3-8B shape, batch 1, fp16, uniform nuq4 unless told), for
``ncu`` to read its counters: ``ncu --clock-control none -k regex:kvq_packed_decode -c 1 --section WarpStateStats
python benchmarks/ncu_decode.py [bits] [uniform|nf]`` (``KVQUANT_CUDA_DEFINES`` picks a kernel variant, see
``triton_kernels/cuda_decode.py``; results/ncu_decode_v1_s8c.txt is the default kernel's report)."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import decode_attention as da

from kvquant_hf.kernels.decode_attention import packed_attention_triton


def main(argv=None):
    argv = list(argv if argv is not None else sys.argv[1:])
    bits = int(argv[0]) if argv else 4
    da.LUT = argv[1] if len(argv) > 1 else "uniform"
    length = int(os.environ.get("CTX", "131072"))
    q = torch.randn(1, da.HQ, 1, da.D, dtype=torch.float16, device="cuda")
    ek = torch.randn(1, da.H, da.SINK + 1, da.D, dtype=torch.float16, device="cuda")
    p = da.make_packed(1, length, bits, da.SLOTS)
    packed_attention_triton(q, p, ek, ek, None, scaling=da.D ** -0.5, inv_freq=da.inv_freq(), decode_backend="cuda")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
