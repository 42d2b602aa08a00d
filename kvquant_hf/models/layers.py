"""Finding a causal LM's decoder layers (``model.model.layers``), shared by the patches, fusions and planner."""

from __future__ import annotations

from ..errors import UnsupportedModelError


def decoder_layers(model):
    """``(base_model, decoder_layers)`` of a causal LM (``model.model.layers``), or UnsupportedModelError."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"cannot find decoder layers on {type(model).__name__}: kvquant_hf supports Llama and Mistral models "
            "loaded with AutoModelForCausalLM (decoder layers at `model.model.layers`)."
        )
    return base, layers
