"""The attention sink of one :class:`~kvquant_hf.cache.KVQuantLayer`: tokens kept exact, never quantized.

The sink holds the first ``config.sink_tokens`` real tokens of every sequence, exact and *pre-RoPE*
(``sink_k / sink_v [B, H, n_sink, D]``, positions ``sink_positions [B, n_sink]`` int32, ``sink_valid`` marking
real tokens), plus the sink keys rotated once when they arrive (``sink_k_rot``, model dtype; decode steps do not
rotate the sink again). Every query attends to the sink exactly, next to the new tokens of its call.

Left padding: the sink of a row holds that row's first *real* tokens; the row's padding goes to the front of its
history and is masked through ``hist_start`` (recorded by :meth:`SinkTokens.store_sink` on the first call).
"""

from __future__ import annotations

import torch

from .layer_api import apply_rope


def gather_seq(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, D]`` gathered along S with per-row indices ``idx [B, n]`` -> ``[B, H, n, D]``."""
    b, h, _, d = x.shape
    return x.gather(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


class SinkTokens:
    """Sink part of ``KVQuantLayer``: allocation, storing the first tokens, the rotated sink keys and the cached
    answer to "is every sink token real" (``sinks_all_valid``: None when not known)."""

    def allocate_sink(self) -> None:
        """Empty sink tensors and per-row state for the layer's batch, heads and dtype."""
        b, h, d, ns = self.batch_size, self.num_heads, self.head_dim, self.config.sink_tokens
        self.sink_k = torch.zeros(b, h, ns, d, dtype=self.dtype, device=self.device)
        self.sink_v = torch.zeros(b, h, ns, d, dtype=self.dtype, device=self.device)
        self.sink_positions = torch.zeros(b, ns, dtype=torch.int32, device=self.device)
        self.sink_valid = torch.zeros(b, ns, dtype=torch.bool, device=self.device)
        self.sink_k_rot = torch.zeros(b, h, ns, d, dtype=self.dtype, device=self.device)
        self.sink_rope = None  # (inv_freq object, attention_scaling) sink_k_rot was rotated with; None: stale
        self.sinks_all_valid = None
        self.hist_start = torch.zeros(b, dtype=torch.int64, device=self.device)
        self.has_hist_pad = False

    def sinks_valid(self) -> bool:
        """Whether every row's sink tokens are real (no left padding in them): then a step with no mask needs no
        exact-block mask at all. Cached on the host (one sync when the sink changed)."""
        if self.sinks_all_valid is None:
            self.sinks_all_valid = bool(self.sink_valid[:, : self.n_sink].all())
        return self.sinks_all_valid

    def rotated_sink(self, rope) -> torch.Tensor:
        """``sink_k_rot[:, :, :n_sink]``: the sink keys rotated to their positions in the model dtype (what the exact
        block needs every step). Rotated when they arrive (:meth:`store_sink`); rotated again here only if ``rope``
        is not the one they were rotated with (a new ``inv_freq`` object, e.g. dynamic RoPE scaling, or a sink
        written without it)."""
        if not self.sink_rope_is(rope):
            self.rotate_sink(rope, slice(0, self.n_sink))
        return self.sink_k_rot[:, :, : self.n_sink]

    def sink_rope_is(self, rope) -> bool:
        """Whether ``sink_k_rot`` was rotated with ``rope``."""
        return (self.sink_rope is not None and self.sink_rope[0] is rope.inv_freq
                and self.sink_rope[1] == rope.attention_scaling)

    def rotate_sink(self, rope, sl: slice) -> None:
        """Rotate the sink keys ``sl`` into ``sink_k_rot`` with ``rope``."""
        cos, sin = rope.cos_sin(self.sink_positions[:, sl], dtype=self.dtype)
        self.sink_k_rot[:, :, sl] = apply_rope(self.sink_k[:, :, sl], cos, sin)
        self.sink_rope = (rope.inv_freq, rope.attention_scaling)

    def store_sink(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None,
                   rope=None):
        """Fill the sink with the first new tokens ``[B, H, L, D]`` (rotating their keys once with ``rope``).

        Returns the tokens left for the history, ``(k, v, positions)``, or None when the sink took them all. On the
        first call, left padding (``real [B, L]`` False) is recorded in ``hist_start``.
        """
        n_new = k.shape[2]
        room = self.config.sink_tokens - self.n_sink
        take = min(room, n_new)
        first_call = self.n_sink == 0 and self.length == 0
        if take > 0:
            if first_call and real is not None and take < n_new:
                # left padding: row b's sink is its first real tokens; its padding goes first in the history
                n_pad = (~real).to(torch.int64).cumprod(-1).sum(-1)  # leading padding per row
                start = n_pad.clamp(max=n_new - take)
                ar = torch.arange(n_new - take, device=self.device)
                sink_idx = start[:, None] + torch.arange(take, device=self.device)
                hist_idx = ar[None, :] + take * (ar[None, :] >= start[:, None])
                self.hist_start = start
                self.has_hist_pad = bool((start > 0).any())
            else:
                sink_idx = torch.arange(take, device=self.device).expand(self.batch_size, take)
                hist_idx = torch.arange(take, n_new, device=self.device).expand(self.batch_size, n_new - take)
            sink_valid = torch.ones_like(sink_idx, dtype=torch.bool) if real is None else real.gather(1, sink_idx)
            sl = slice(self.n_sink, self.n_sink + take)
            self.sink_k[:, :, sl] = gather_seq(k, sink_idx)
            self.sink_v[:, :, sl] = gather_seq(v, sink_idx)
            self.sink_positions[:, sl] = positions.gather(1, sink_idx).to(torch.int32)
            self.sink_valid[:, sl] = sink_valid
            if real is not None:  # padding may have reached the sink: ask again when needed (new real tokens
                self.sinks_all_valid = None  # leave a known answer as it was)
            self.n_sink += take
            if rope is None:
                self.sink_rope = None  # rotated when read
            else:  # the new sink tokens, or all of them if the earlier ones were rotated with another RoPE
                self.rotate_sink(rope, sl if self.sink_rope_is(rope) else slice(0, self.n_sink))
            if take == n_new:
                return None
            return gather_seq(k, hist_idx), gather_seq(v, hist_idx), positions.gather(1, hist_idx)
        if first_call and real is not None:
            # no sink: leading padding is masked through hist_start
            self.hist_start = (~real).to(torch.int64).cumprod(-1).sum(-1)
            self.has_hist_pad = bool((self.hist_start > 0).any())
        return k, v, positions
