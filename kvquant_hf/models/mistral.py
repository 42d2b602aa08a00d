"""Mistral attention forward: the Llama one plus the config's sliding window."""

from __future__ import annotations

from .llama import kvquant_attention_forward


def mistral_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """Patched ``MistralAttention.forward``: honours ``config.sliding_window``."""
    window = getattr(self.config, "sliding_window", None)
    return kvquant_attention_forward(
        self, hidden_states, position_embeddings, attention_mask, sliding_window=window, **kwargs
    )
