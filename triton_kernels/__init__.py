"""Triton kernels of kvquant_hf: pack-on-append quantization and attention over the packed cache.

The kernels work on plain tensors and never import transformers. Their single source of truth for
the math is :mod:`kvquant_hf.quant` (bit packing, normalization, outlier slots) and the torch
reference attention in :mod:`kvquant_hf.attention`.

Set ``TRITON_INTERPRET=1`` *before* importing these modules to run them on CPU tensors (tests).
"""

from .decode_attention import default_num_splits, packed_attention_triton
from .dequantize import dequantize_history_triton, merge_lse_
from .exact_block import decode_prep
from .guard import zero_nonfinite_tokens_
from .quantize import KeyCodes, ValueCodes, quantize_keys_triton, quantize_kv_triton, quantize_values_triton
from .window_write import window_append_

__all__ = [
    "KeyCodes",
    "ValueCodes",
    "decode_prep",
    "default_num_splits",
    "dequantize_history_triton",
    "merge_lse_",
    "packed_attention_triton",
    "quantize_keys_triton",
    "quantize_kv_triton",
    "quantize_values_triton",
    "window_append_",
    "zero_nonfinite_tokens_",
]
