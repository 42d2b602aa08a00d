"""Per-architecture attention patches, registered by ``model_type``.

``patch_model(model)`` swaps the attention forward of every decoder layer for one that hands
pre-RoPE keys to the cache layer (see :mod:`kvquant_hf.layer_api`). Patched layers behave exactly
like the originals with any cache that is not a kvquant cache (DynamicCache, no cache, ...).
"""

from __future__ import annotations

import inspect
import types

from ..errors import UnsupportedModelError
from .layers import decoder_layers
from .llama import llama_attention_forward
from .mistral import mistral_attention_forward

#: model_type -> attention forward that replaces the stock one
PATCHES = {
    "llama": llama_attention_forward,
    "mistral": mistral_attention_forward,
}

SUPPORTED_MODEL_TYPES = tuple(sorted(PATCHES))

#: transformers versions the patches are written for: [minimum, first unsupported major)
SUPPORTED_TRANSFORMERS = ("5.17", "6")


def check_transformers_version(version: str | None = None) -> None:
    """Raise UnsupportedModelError unless ``version`` (default: the installed transformers) is in
    ``SUPPORTED_TRANSFORMERS`` (the attention and cache interfaces changed before 5.17 and may change in 6)."""
    from packaging.version import InvalidVersion, Version

    if version is None:
        import transformers

        version = transformers.__version__
    low, high = SUPPORTED_TRANSFORMERS
    try:
        parsed = Version(version)
    except InvalidVersion as exc:
        raise UnsupportedModelError(
            f"cannot parse the transformers version {version!r}; kvquant_hf supports transformers>={low},<{high}."
        ) from exc
    if not Version(low) <= Version(parsed.base_version) < Version(high):
        raise UnsupportedModelError(
            f"transformers {version} is not supported; kvquant_hf supports transformers>={low},<{high} (tested on "
            f"5.17 and 5.24). Install one: pip install 'transformers>={low},<{high}'."
        )


def check_supported(model) -> str:
    """Return the model_type if kvquant_hf can patch it, else raise UnsupportedModelError."""
    check_transformers_version()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PATCHES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by kvquant_hf; supported model types are "
            f"{list(SUPPORTED_MODEL_TYPES)}. Use a DynamicCache for other architectures."
        )
    return model_type


def patch_model(model):
    """Patch every attention layer of a Llama/Mistral model in place (idempotent); returns the model.

    Example:
        >>> from kvquant_hf import patch_model
        >>> patch_model(model)  # doctest: +SKIP
    """
    model_type = check_supported(model)
    if getattr(model, "_kvquant_patched", False):
        return model
    base, layers = decoder_layers(model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no rotary embedding with inv_freq; kvquant_hf needs RoPE models."
        )
    forward = PATCHES[model_type]
    for layer in layers:
        attn = layer.self_attn
        if "_kvquant_original_forward" in attn.__dict__:  # patched already (a concurrent first call)
            continue
        attn.__dict__["_kvquant_rotary"] = rotary  # plain attribute: not a registered submodule
        attn.__dict__["_kvquant_original_forward"] = attn.forward
        # transformers >= 5.24 names the cache argument `cache`, earlier 5.x `past_key_values`
        params = inspect.signature(attn.forward).parameters
        attn.__dict__["_kvquant_cache_kw"] = "cache" if "cache" in params else "past_key_values"
        attn.forward = types.MethodType(forward, attn)
    model._kvquant_patched = True
    return model


def unpatch_model(model):
    """Undo :func:`patch_model` (and :func:`kvquant_hf.models.norms.fuse_rms_norms` /
    :func:`kvquant_hf.models.projections.fuse_projections`, if applied)."""
    if getattr(model, "_kvquant_fused_norms", False):
        from .norms import unfuse_rms_norms

        unfuse_rms_norms(model)
    if getattr(model, "_kvquant_fused_projections", False):
        from .projections import unfuse_projections

        unfuse_projections(model)
    if not getattr(model, "_kvquant_patched", False):
        return model
    _, layers = decoder_layers(model)
    for layer in layers:
        attn = layer.self_attn
        original = attn.__dict__.pop("_kvquant_original_forward", None)
        attn.__dict__.pop("forward", None)
        attn.__dict__.pop("_kvquant_rotary", None)
        if original is not None and getattr(original, "__func__", None) is not type(attn).forward:
            attn.forward = original
    model._kvquant_patched = False
    return model


__all__ = ["PATCHES", "SUPPORTED_MODEL_TYPES", "check_supported", "patch_model", "unpatch_model"]
