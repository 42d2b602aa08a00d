"""The exact recent window of one :class:`~kvquant_hf.cache.KVQuantLayer`: the last tokens kept in the model dtype.

With ``config.recent_window = R > 0`` the sink tensors (``sink_k``, ``sink_v``, ``sink_k_rot``, ``sink_positions``,
``sink_valid``) hold ``sink_tokens + R`` slots: the sink, then a ring of ``R`` slots where history token ``j`` lives
in slot ``sink_tokens + j % R``. Every history token is packed when it arrives, as without a window; the ring also
keeps the last ``min(R, length)`` of them exact (pre-RoPE and rotated keys, values, positions). Attention then
reads the packed history only up to ``length - n_window`` and the ring through the exact block
``[sink | window | new tokens]``, so a query sees the R tokens before it exactly (plus itself) and older ones in
their packed form. The slots ``[:n_exact]`` are contiguous: history tokens exist only once the sink is full.

A ring slot is *valid* when its token is real (history index ``>= hist_start`` of its row); left padding that
reaches the ring is masked like padding in the sink. ``crop`` refills the ring: tokens that had already left it
come back dequantized from the packed history (:meth:`RecentWindow.refill_window`).

CUDA-graph decode reads the whole ring (``R`` slots, unfilled ones invalid) and the packed history up to the
device-side ``attend_len_dev = max(length - R, 0)``; the new token goes to slot ``sink_tokens + length % R`` computed
on the device. On the Triton backend one kernel writes a decode token into the ring (and, in graph mode, the next
step's ``attend_len_dev``): :func:`kvquant_hf.kernels.window_append_`.
"""

from __future__ import annotations

import torch

from .errors import KVQuantError
from .layer_api import apply_rope
from .routing import device_guard


class RecentWindow:
    """Recent-window part of ``KVQuantLayer``: how many tokens are exact, storing them, refilling after a crop."""

    @property
    def n_window(self) -> int:
        """History tokens the ring holds exact (host view): ``min(recent_window, length)``; the whole ring in
        CUDA-graph mode (its unfilled slots are invalid)."""
        r = self.config.recent_window
        if r == 0 or not self.is_initialized:
            return 0
        return r if self.graph_mode else min(r, self.length)

    @property
    def n_exact(self) -> int:
        """Exact slots the attention reads: the sink tokens held, then the window."""
        return self.n_sink + self.n_window

    def attended_length(self) -> int:
        """Packed history tokens the attention reads (host length): the ones older than the window."""
        return self.length - min(self.config.recent_window, self.length)

    def attended_length_dev(self) -> torch.Tensor:
        """The packed tokens the attention reads, on the device (CUDA-graph decode): ``length_dev`` without a window,
        else ``attend_len_dev`` (``max(length - R, 0)``, advanced by the ring write of each step)."""
        return self.length_dev if self.config.recent_window == 0 else self.attend_len_dev

    def sync_attended_length(self) -> None:
        """Set ``attend_len_dev`` from the host length (entering graph mode, after a crop or rewind)."""
        if self.config.recent_window and self.length_dev is not None:
            if getattr(self, "attend_len_dev", None) is None:
                self.attend_len_dev = torch.zeros(1, dtype=torch.int32, device=self.device)
            self.attend_len_dev.fill_(self.attended_length())

    def window_valid(self) -> bool:
        """Whether every ring slot the attention reads holds a real token (cached on the host; one sync when it
        is not known). Rows without left padding in their history always are."""
        if self.n_window == 0:
            return True
        if self.window_all_valid is None:
            ns = self.config.sink_tokens
            self.window_all_valid = bool(self.sink_valid[:, ns: ns + self.n_window].all())
        return self.window_all_valid

    def store_window(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, start: int, rope=None,
                     k_rot: torch.Tensor | None = None) -> None:
        """Copy the last ``min(R, n)`` of the ``n`` tokens appended to the history at ``start`` into the ring.

        Args:
            k, v: pre-RoPE keys and values ``[B, H, n, D]`` (model dtype), in history order. positions: ``[B, n]``.
            start: history index of the first of them (ignored in CUDA-graph mode: the device length is used).
            rope: rotates the keys into ``sink_k_rot`` (None: rotated when read).
            k_rot: the same keys already rotated (the exact block's copy), used instead of rotating again.
        """
        r = self.config.recent_window
        if r == 0:
            return
        ns, n = self.config.sink_tokens, k.shape[2]
        if n == 1 and k_rot is not None and self.backend == "triton":
            from .kernels import window_append_

            graph = self.graph_mode
            with device_guard(self.device):
                window_append_(k, v, k_rot, positions, self.sink_k, self.sink_v, self.sink_k_rot, self.sink_positions,
                               self.sink_valid, ns, r, index=None if graph else start,
                               length_dev=self.length_dev if graph else None,
                               attend_len=self.attend_len_dev if graph else None)
            if not graph:
                self.window_all_valid = None if self.has_hist_pad else True
            return
        m = min(r, n)
        k, v, positions = k[:, :, n - m:], v[:, :, n - m:], positions[:, n - m:]
        if k_rot is not None:
            k_rot = k_rot[:, :, k_rot.shape[2] - m:]
        if self.graph_mode:
            raise KVQuantError(
                f"layer {self.layer_idx}: CUDA-graph decode writes the recent window with the Triton kernel (one "
                "token per step, rotated keys from the exact block); this call has neither."
            )
        j = torch.arange(start + n - m, start + n, device=self.device)
        slot = j % r + ns
        real = j[None, :] >= self.hist_start[:, None]
        self.window_all_valid = None if self.has_hist_pad else True
        self.sink_k.index_copy_(2, slot, k)
        self.sink_v.index_copy_(2, slot, v)
        self.sink_positions.index_copy_(1, slot, positions.to(torch.int32))
        self.sink_valid.index_copy_(1, slot, real)
        if k_rot is not None:
            self.sink_k_rot.index_copy_(2, slot, k_rot.to(self.dtype))
        elif rope is not None and self.sink_rope_is(rope):
            cos, sin = rope.cos_sin(positions, dtype=self.dtype)
            self.sink_k_rot.index_copy_(2, slot, apply_rope(k, cos, sin))
        else:
            self.sink_rope = None  # every exact slot is rotated again when read

    def refill_window(self, old_length: int) -> None:
        """After the history shrank from ``old_length`` to ``length`` (``crop``): put back into the ring the tokens
        of the new window that had already left it, dequantized from the packed history, and invalidate the slots
        beyond the new length."""
        r = self.config.recent_window
        if r == 0:
            return
        ns, length = self.config.sink_tokens, self.length
        lo, hi = max(length - r, 0), min(length, max(old_length - r, 0))
        if hi > lo:
            view = self.packed_view()
            k, v = view.dequantize_block(lo, hi)
            self.store_ring_slots(torch.arange(lo, hi, device=self.device), k.to(self.dtype), v.to(self.dtype))
        if length < r:
            self.sink_valid[:, ns + length:] = False
        self.window_all_valid = None

    def store_ring_slots(self, j: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write history tokens ``j`` (pre-RoPE ``k``, ``v`` ``[B, H, len(j), D]``) into their ring slots, with their
        stored positions; their rotated keys are made when read."""
        slot = j % self.config.recent_window + self.config.sink_tokens
        self.sink_k.index_copy_(2, slot, k)
        self.sink_v.index_copy_(2, slot, v)
        self.sink_positions.index_copy_(1, slot, self.positions.index_select(1, j))
        self.sink_valid.index_copy_(1, slot, j[None, :] >= self.hist_start[:, None])
        self.sink_rope = None
