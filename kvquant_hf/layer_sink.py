"""The attention sink of one :class:`~kvquant_hf.cache.KVQuantLayer`: tokens kept exact, never quantized.

The sink holds the first ``config.sink_tokens`` real tokens of every sequence, exact and *pre-RoPE*
(``sink_k / sink_v [B, H, n_sink, D]``, positions ``sink_positions [B, n_sink]`` int32, ``sink_valid`` marking
real tokens), plus the sink keys rotated once when they arrive (``sink_k_rot``, model dtype; decode steps do not
rotate the sink again). Every query attends to the sink exactly, next to the new tokens of its call.

Left padding: the sink of a row holds that row's first *real* tokens; the row's padding goes to the front of its
history and is masked through ``hist_start`` (kept by :meth:`SinkTokens.place_padded` over every call, so padding
longer than a prefill chunk stays masked). Padding after a row's first real token is refused
(:meth:`SinkTokens.check_left_padding`).
"""

from __future__ import annotations

import torch

from .errors import KVQuantConfigError
from .layer_api import apply_rope


def gather_seq(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, D]`` gathered along S with per-row indices ``idx [B, n]`` -> ``[B, H, n, D]``."""
    b, h, _, d = x.shape
    return x.gather(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


def padded_inside(real: torch.Tensor) -> torch.Tensor:
    """Per row of ``real [B, L]`` (bool): whether padding follows a real token within the row."""
    return (real[:, :-1] & ~real[:, 1:]).any(-1)


def left_padding_only_error(rows: list[int], where: str = "") -> KVQuantConfigError:
    """The error for rows with padding after their first real token: the cache masks left padding only."""
    return KVQuantConfigError(
        f"{where}the attention mask has padding after real tokens in batch row(s) {rows}; the KVQuant cache supports "
        "left padding only (zeros before a row's first real token). Left-pad the batch "
        "(tokenizer.padding_side = 'left'), or run those prompts separately."
    )


class SinkTokens:
    """Sink part of ``KVQuantLayer``: allocation, storing the first tokens, the rotated sink keys and the cached
    answer to "is every sink token real" (``sinks_all_valid``: None when not known)."""

    def allocate_sink(self) -> None:
        """Empty sink tensors and per-row state for the layer's batch, heads and dtype."""
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        ns = self.config.sink_tokens + self.config.recent_window  # the recent window's ring follows the sink
        self.sink_k = torch.zeros(b, h, ns, d, dtype=self.dtype, device=self.device)
        self.sink_v = torch.zeros(b, h, ns, d, dtype=self.dtype, device=self.device)
        self.sink_positions = torch.zeros(b, ns, dtype=torch.int32, device=self.device)
        self.sink_valid = torch.zeros(b, ns, dtype=torch.bool, device=self.device)
        self.sink_k_rot = torch.zeros(b, h, ns, d, dtype=self.dtype, device=self.device)
        self.sink_rope = None  # (inv_freq object, attention_scaling) sink_k_rot was rotated with; None: stale
        self.sinks_all_valid = None
        self.window_all_valid = None
        self.hist_start = torch.zeros(b, dtype=torch.int64, device=self.device)
        self.has_hist_pad = False

    def __getstate__(self) -> dict:
        """Pickled state: ``sink_rope`` names the model's ``inv_freq`` object, which a loaded layer cannot share,
        so the sink keys are rotated again (to the same values) the first time they are read."""
        parent = getattr(super(), "__getstate__", None)  # (object.__getstate__ from Python 3.11)
        state = dict(parent() if parent is not None else self.__dict__)
        state["sink_rope"] = None
        return state

    def sinks_valid(self) -> bool:
        """Whether every row's sink tokens are real (no left padding in them): then a step with no mask needs no
        exact-block mask at all. Cached on the host (one sync when the sink changed)."""
        if self.sinks_all_valid is None:
            self.sinks_all_valid = bool(self.sink_valid[:, : self.n_sink].all())
        return self.sinks_all_valid

    def rotated_sink(self, rope) -> torch.Tensor:
        """``sink_k_rot[:, :, :n_exact]``: the sink and recent-window keys rotated to their positions in the model
        dtype (what the exact block needs every step). Rotated when they arrive (:meth:`store_sink`,
        :meth:`~kvquant_hf.layer_window.RecentWindow.store_window`); rotated again here only if ``rope`` is not the
        one they were rotated with (a new ``inv_freq`` object, e.g. dynamic RoPE scaling, or tokens written without
        it)."""
        n = self.n_exact
        if not self.sink_rope_is(rope):
            self.rotate_sink(rope, slice(0, n))
        return self.sink_k_rot[:, :, :n]

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
        """Fill the sink with the first real new tokens ``[B, H, L, D]`` (rotating their keys once with ``rope``).

        Returns the tokens left for the history, ``(k, v, positions)``, or None when the sink took them all. Left
        padding (``real [B, L]`` False) is placed by :meth:`place_padded` whenever a call has a mask and several
        tokens, or a row's sink still waits for real tokens; otherwise the first tokens go to the sink.
        """
        n_new = k.shape[2]
        take = min(self.config.sink_tokens - self.n_sink, n_new)
        first_call = self.n_sink == 0 and self.length == 0
        if real is not None and (n_new > 1 or first_call) and bool(real.all()):
            real = None  # no padding in this call (one host sync; a prefill chunk, not a decode step)
        if (real is not None and (n_new > 1 or first_call)) or (
                self.n_sink and not self.graph_mode and not self.sinks_valid()):
            self.placed_padded = True
            return self.place_padded(k, v, positions, real, rope, take)
        if take <= 0:
            return k, v, positions
        sl = slice(self.n_sink, self.n_sink + take)
        self.sink_k[:, :, sl] = k[:, :, :take]
        self.sink_v[:, :, sl] = v[:, :, :take]
        self.sink_positions[:, sl] = positions[:, :take].to(torch.int32)
        sink_valid = True if real is None else real[:, :take]
        self.sink_valid[:, sl] = sink_valid
        if real is not None:  # padding may have reached the sink: ask again when needed (new real tokens
            self.sinks_all_valid = None  # leave a known answer as it was)
        self.n_sink += take
        self._rotate_new_sink(rope, sl)
        if take == n_new:
            return None
        return k[:, :, take:], v[:, :, take:], positions[:, take:]

    def _rotate_new_sink(self, rope, sl: slice) -> None:
        if rope is None:
            self.sink_rope = None  # rotated when read
        else:  # the new sink tokens, or all of them if the earlier ones were rotated with another RoPE
            self.rotate_sink(rope, sl if self.sink_rope_is(rope) else slice(0, self.n_exact))

    def place_padded(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None,
                     rope, take: int):
        """Store new tokens of left-padded rows: each row's real tokens fill its sink slots that do not yet hold a
        real token (in arrival order), then go to the history; its padding (and the padding displaced from the
        sink) goes to the front of its history, where ``hist_start`` masks it. Works across calls, so a row whose
        padding spans several prefill chunks keeps its first real tokens as sink.

        Invariants per row ``b``: ``sink_valid[b]`` is a prefix of the sink; history tokens ``< hist_start[b]`` are
        padding; a row whose sink is not full of real tokens has only padding in its history. Padding after a
        row's first real token is refused earlier (:meth:`check_left_padding`).
        """
        b, dev, n_new = self.batch_size, self.device, k.shape[2]
        if real is None:
            real = torch.ones(b, n_new, dtype=torch.bool, device=dev)
        real = real.to(dev, torch.bool).expand(b, n_new)
        n_hist = n_new - take
        n_slots = self.n_sink + take
        pad = (~real).to(torch.int64).sum(-1)  # leading padding per row (padding after real tokens is refused)
        held = self.sink_valid[:, : self.n_sink].to(torch.int64).sum(-1)  # real tokens in the sink per row
        to_sink = torch.minimum(n_new - pad, n_slots - held)  # real tokens of this call that go to the sink
        hist_pad = n_hist - (n_new - pad - to_sink)  # padding slots at the front of this call's history part
        if n_slots:
            slot = torch.arange(n_slots, device=dev)[None, :]
            fill = (slot >= held[:, None]) & (slot < (held + to_sink)[:, None])  # [B, slots] written now
            src = (pad[:, None] + slot - held[:, None]).clamp(0, n_new - 1)
            new_k, new_v = gather_seq(k, src), gather_seq(v, src)
            sl = slice(0, n_slots)
            self.sink_k[:, :, sl] = torch.where(fill[:, None, :, None], new_k, self.sink_k[:, :, sl])
            self.sink_v[:, :, sl] = torch.where(fill[:, None, :, None], new_v, self.sink_v[:, :, sl])
            new_pos = positions.gather(1, src).to(torch.int32)
            self.sink_positions[:, sl] = torch.where(fill, new_pos, self.sink_positions[:, sl])
            self.sink_valid[:, sl] = slot < (held + to_sink)[:, None]
            self.n_sink = n_slots
            self.sinks_all_valid = None
            if rope is None:
                self.sink_rope = None
            else:
                self.rotate_sink(rope, sl if self.sink_rope_is(rope) else slice(0, self.n_exact))
        self.hist_start += hist_pad
        self.has_hist_pad = bool((self.hist_start > 0).any())
        if n_hist == 0:
            return None
        j = torch.arange(n_hist, device=dev)[None, :]
        hist_idx = torch.where(j < hist_pad[:, None], j, pad[:, None] + to_sink[:, None] + j - hist_pad[:, None])
        hist_idx = hist_idx.clamp(0, n_new - 1)
        return gather_seq(k, hist_idx), gather_seq(v, hist_idx), positions.gather(1, hist_idx)

    def check_left_padding(self, real: torch.Tensor) -> None:
        """Refuse padding after a row's first real token (in this call or after real tokens stored earlier): the
        cache masks only left padding, so such a token would be attended to. One host sync: ``attend`` calls it for
        calls of several tokens and while a row's sink waits for real tokens, never on a plain decode step."""
        n_new = real.shape[-1]
        real = real.to(self.device, torch.bool).expand(self.batch_size, n_new)
        inner = padded_inside(real)
        if self.is_initialized and self.n_sink + self.length > 0:
            stored_real = self.sink_valid[:, : self.n_sink].any(-1) | (self.hist_start < self.length)
            inner = inner | (stored_real & ~real[:, 0])
        if bool(inner.any()):
            raise left_padding_only_error([int(r) for r in inner.nonzero()[:, 0]], f"layer {self.layer_idx}: ")
