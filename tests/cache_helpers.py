"""Helpers shared by the KVQuantCache tests: tiny signposts, the lossless setting, synthetic attend inputs."""

from __future__ import annotations

import copy

import torch

from kvquant_hf import quant
from kvquant_hf.cache import KVQuantCache
from kvquant_hf.generation import cache_kwarg_name
from kvquant_hf.layer_api import AttendInputs, RopeContext, apply_rope
from kvquant_hf.models import patch_model
from kvquant_hf.signposts import LayerSignposts, Signposts

HEAD_DIM = 16


def make_signposts(model, lut: torch.Tensor, lower: float | torch.Tensor, upper: float | torch.Tensor, bits: int):
    """In-memory Signposts for `model` with the same table and thresholds in every layer."""
    cfg = model.config
    h = cfg.num_key_value_heads
    lo = torch.full((h, HEAD_DIM), float(lower)) if not isinstance(lower, torch.Tensor) else lower
    hi = torch.full((h, HEAD_DIM), float(upper)) if not isinstance(upper, torch.Tensor) else upper
    layers = [
        LayerSignposts(lut.clone(), lut.clone(), lo.clone(), hi.clone(), torch.zeros(4), torch.zeros(4))
        for _ in range(cfg.num_hidden_layers)
    ]
    meta = {
        "bits": bits,
        "model": {
            "model_type": cfg.model_type,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": h,
            "head_dim": HEAD_DIM,
            "hidden_size": cfg.hidden_size,
        },
    }
    return Signposts(layers=layers, metadata=meta)


def make_lossless(model):
    """Make quantization exact for `model` (modified in place) and return `(cache_factory, reference_model)`.

    The lossless setting: head_dim 16 with 15 outlier slots; channel 0 of every key head is forced to exactly 0
    (zeroed k_proj rows, in the reference too) and sits inside the calibrated range [0, 0], every other key
    channel is an outlier stored exactly; each value token keeps 15 exact slots and the remaining channel is
    its own zero point, decoded through the table entry 0 (the table contains 0 exactly). Float32 models also
    need float32 value scale/zero (`fp32_value_scales` fixture).
    """
    h = model.config.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.view(h, HEAD_DIM, -1)[:, 0] = 0
    reference = copy.deepcopy(model)
    lut = torch.linspace(-1.0, 0.875, 16)  # step 0.125: contains 0 exactly
    sp = make_signposts(model, lut, 0.0, 0.0, bits=4)
    patch_model(model)

    def factory(**overrides):
        cfg = {"bits": 4, "outlier_slots": HEAD_DIM - 1, "sink_tokens": 2, "block_size": 16, **overrides}
        return KVQuantCache(cfg, signposts=sp, model_config=model.config)

    return factory, reference


def forward(model, ids, cache, **kwargs):
    return model(ids, **{cache_kwarg_name(model): cache}, **kwargs).logits


def chunked_logits(model, ids, cache, chunks):
    """Logits of `ids` fed in chunks of the given sizes (the rest one token at a time)."""
    outs, pos = [], 0
    sizes = list(chunks) + [1] * (ids.shape[1] - sum(chunks))
    with torch.no_grad():
        for n in sizes:
            outs.append(forward(model, ids[:, pos : pos + n], cache))
            pos += n
    return torch.cat(outs, dim=1)


def rope_for(positions: torch.Tensor, inv_freq: torch.Tensor, dtype=torch.float32) -> RopeContext:
    ctx = RopeContext(cos=None, sin=None, inv_freq=inv_freq)
    ctx.cos, ctx.sin = ctx.cos_sin(positions, dtype)
    return ctx


def synthetic_inputs(b, hq, h, n, pos0, dtype=torch.float32, seed=0, mask=None, window=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, HEAD_DIM, generator=g).to(dtype)
    k = (torch.randn(b, h, n, HEAD_DIM, generator=g) * 2).to(dtype)
    v = torch.randn(b, h, n, HEAD_DIM, generator=g).to(dtype)
    positions = torch.arange(pos0, pos0 + n).expand(b, n)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    rope = rope_for(positions, inv_freq, dtype)
    q = apply_rope(q, rope.cos, rope.sin)
    return AttendInputs(q, k, v, positions, rope, mask, HEAD_DIM**-0.5, window)


def calibrated_layer_signposts(h, bits=4, lower=-1.5, upper=1.5):
    lut = quant.normal_float_signposts(bits)
    return LayerSignposts(lut, lut, torch.full((h, HEAD_DIM), lower), torch.full((h, HEAD_DIM), upper),
                          torch.zeros(4), torch.zeros(4))


def filled_cache(model, batch=3, n=14, **overrides):
    sp = make_signposts(model, quant.normal_float_signposts(4), -1.0, 1.0, bits=4)
    cache = KVQuantCache({"bits": 4, "sink_tokens": 1, "block_size": 16, **overrides}, signposts=sp,
                         model_config=model.config)
    ids = torch.randint(1, 128, (batch, n), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        forward(model, ids, cache)
    return cache, ids


def for_greedy_generate(model):
    """``model`` set up for greedy ``generate`` tests: pad token 0, no EOS (every call runs its full length)."""
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def returned_cache(out):
    """The cache a ``generate(return_dict_in_generate=True)`` result carries (``cache`` or ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out["past_key_values"]
