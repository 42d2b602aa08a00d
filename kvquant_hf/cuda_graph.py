"""Decode steps replayed from a CUDA graph: no per-kernel launch overhead.

A transformers decode step launches hundreds of small kernels; on a fast GPU the CPU cannot issue them
as fast as they run, so a step costs far more than reading the weights and the cache. With a
`KVQuantCache` the whole step can be captured once and replayed: the cache layers switch to *graph
mode* (capacity reserved up front, the history length kept in a device tensor that the kernels read and
the decoder advances once per step after the last layer, a fixed split grid), so one captured graph serves every
later step.

Use it from ``generate`` with ``cache_config={"cuda_graph": True}`` or directly::

    >>> decoder = CUDAGraphDecoder(model, cache, batch_size=1, max_steps=256)  # after the prefill
    >>> logits = decoder.step(next_ids, positions)                               # [B, 1, vocab]

Limits: CUDA and the Triton backend only; one new token per sequence per step; the attention mask is
not read during replay (left padding recorded at prefill still applies, a mask that changes between
steps does not).
"""

from __future__ import annotations

import inspect

import torch

from .cache import KVQuantCache
from .errors import BackendUnavailableError, KVQuantError, KVQuantNumericalError


class CUDAGraphDecoder:
    """Capture one decode step of ``model`` over ``cache`` and replay it.

    Args:
        model: a patched Llama/Mistral model on CUDA.
        cache (`KVQuantCache`): holding the prompt already (prefilled), Triton backend.
        batch_size (`int`): rows per step.
        max_steps (`int`): decode steps this decoder may take (capacity is reserved for them now).
        num_splits (`int`, optional): split-K grid of the attention kernel (default fills the GPU at capacity).
        forward (callable, optional): what to capture instead of ``model(...)`` (keyword arguments only).
    """

    def __init__(self, model, cache: KVQuantCache, batch_size: int, max_steps: int, num_splits: int | None = None,
                 forward=None):
        if not torch.cuda.is_available():
            raise BackendUnavailableError("CUDA-graph decode needs a CUDA GPU; turn cuda_graph off on this machine.")
        if not isinstance(cache, KVQuantCache):
            raise KVQuantError(f"CUDAGraphDecoder needs a KVQuantCache, got {type(cache).__name__}.")
        self.model = model
        self.forward = forward if forward is not None else model
        self.cache = cache
        self.batch_size = batch_size
        self.max_steps = int(max_steps)
        self.steps = 0
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        device = next(model.parameters()).device
        # one device-side length per (device, length) group of layers, advanced once per step after the last layer
        # (not by every layer's append: one small kernel per step instead of one per layer)
        shared: dict[tuple, torch.Tensor] = {}
        for layer in cache.layers:
            key = (str(layer.device), layer.length)
            if key not in shared:
                shared[key] = torch.tensor([layer.length], dtype=torch.int32, device=layer.device)
            layer.enter_graph_mode(self.max_steps + 2, num_splits, length_dev=shared[key])
        self.static_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.static_pos = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        start = cache.layers[0].get_seq_length()
        self.static_pos.fill_(start)
        # warm up (compiles the kernels, lets transformers settle its lazy state) on a side stream, then rewind
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self._rewind_device(2)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.static_logits = self._forward()
        # graph mode contains NaN/Inf tokens on the device; with nonfinite="error" each step is checked afterwards
        self.check_nonfinite = cache.config.nonfinite == "error"
        self.nonfinite_seen = self.nonfinite_counts()

    def nonfinite_counts(self) -> list[int]:
        return torch.cat([layer.nonfinite_counter for layer in self.cache.layers]).tolist()

    def _forward(self) -> torch.Tensor:
        out = self.forward(input_ids=self.static_ids, position_ids=self.static_pos, use_cache=True,
                         **{self._cache_kw: self.cache})
        # the lengths __init__ shared between the layers (no layer advances them): every layer has appended its
        # token at the old length
        for length in self._device_lengths():
            length.add_(1)
        return out.logits

    def _device_lengths(self) -> list[torch.Tensor]:
        """The distinct device-side lengths of the cache's layers (shared ones once)."""
        seen: dict[int, torch.Tensor] = {}
        for layer in self.cache.layers:
            seen.setdefault(id(layer.length_dev), layer.length_dev)
        return list(seen.values())

    def _rewind_device(self, n: int) -> None:
        for length in self._device_lengths():
            length.sub_(n)

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One decode step: ``input_ids``/``position_ids`` ``[B, 1]``; returns the logits ``[B, 1, vocab]``
        (a static buffer overwritten by the next step: clone it to keep it)."""
        if self.steps >= self.max_steps:
            raise KVQuantError(
                f"CUDAGraphDecoder reserved {self.max_steps} steps and all are used; build a new decoder "
                "(or give a larger max_steps / max_new_tokens)."
            )
        self.static_ids.copy_(input_ids.view(self.batch_size, 1))
        self.static_pos.copy_(position_ids.view(self.batch_size, 1))
        self.graph.replay()
        for layer in self.cache.layers:
            layer.length += 1
        self.steps += 1
        if self.check_nonfinite:
            counts = self.nonfinite_counts()  # one host sync per step
            if counts != self.nonfinite_seen:
                bad = [i for i, (a, b) in enumerate(zip(counts, self.nonfinite_seen)) if a != b]
                self.rewind(1)
                for layer, n in zip(self.cache.layers, self.nonfinite_seen):
                    layer.nonfinite_counter.fill_(n)
                raise KVQuantNumericalError(
                    f"layer {bad[0]}: NaN or Inf in the new keys/values of the CUDA-graph decode step at position(s) "
                    f"{position_ids.flatten().tolist()[:8]}; the step was rolled back (the cache holds what it held "
                    "before it). Pass cache_config={'nonfinite': 'zero'} to store such tokens as zeros instead.",
                    layer_idx=bad[0], positions=position_ids.flatten().tolist()[:8], tensors=["keys/values"],
                )
        return self.static_logits

    def rewind(self, n: int) -> None:
        """Forget the last ``n`` decoded tokens (host and device lengths; the recent window gets back, dequantized,
        the tokens those steps pushed out of it)."""
        for layer in self.cache.layers:
            layer.length -= n
            layer.refill_window(layer.length + n)
            layer.sync_attended_length()
        self._rewind_device(n)
        self.steps -= n

    def close(self) -> None:
        """Leave graph mode (the cache keeps its tokens and works eagerly again)."""
        for layer in self.cache.layers:
            layer.exit_graph_mode()
        self.graph = None
