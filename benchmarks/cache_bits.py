"""Stored bits per K/V element of a KVQuantCache (``memory_stats()``, from ``get_memory_footprint()``).

For head_dim 64 (SmolLM2) and 128 (Llama/Mistral 7-8B), nuq4/3/2 with 1% outliers, bf16/fp16/fp32 models
(outlier values are stored in the model dtype). Bits do not depend on the values, so a tiny random model
with the right head_dim is enough. Usage: ``python benchmarks/cache_bits.py``
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from cache_accuracy_smollm2 import bits_for_shape
from common import md_table, write_results


def main():
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for head_dim in (64, 128):
            for bits in (4, 3, 2):
                # KV heads of the real shapes: SmolLM2 (3 x 64), Llama-3-8B / Mistral-7B (8 x 128)
                s = bits_for_shape(head_dim, bits, dtype=dtype, kv_heads=3 if head_dim == 64 else 8)
                rows.append({"dtype": str(dtype).replace("torch.", ""), "head_dim": head_dim, "kv_heads": 3 if head_dim == 64 else 8,
                             "method": f"nuq{bits}-1%", "outlier_slots": s["outlier_slots"],
                             "key_bits": s["key_bits_per_element"], "value_bits": s["value_bits_per_element"],
                             "avg_bits": s["avg_bits_per_element"], "avg_bits_all_bytes": s["avg_bits_per_element_all"],
                             "compression_vs_fp16": s["compression_ratio"]})
                print(rows[-1], flush=True)
    md = ("# Stored bits per K/V element (`cache.memory_stats()`)\n\n"
          "`avg_bits`: codes + per-token value scale/zero + outlier slots (value in the model dtype + uint8 channel) "
          "per quantized element; `avg_bits_all_bytes`: every stored byte (1 exact sink token and int32 positions "
          "included) over the elements held (600 tokens).\n\n"
          + md_table(rows, ["dtype", "head_dim", "kv_heads", "method", "outlier_slots", "key_bits", "value_bits", "avg_bits",
                            "avg_bits_all_bytes", "compression_vs_fp16"]))
    print(write_results("cache_bits", rows, md))


if __name__ == "__main__":
    main()
