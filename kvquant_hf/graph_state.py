"""CUDA-graph decode state of one :class:`~kvquant_hf.cache.KVQuantLayer`.

A captured decode step cannot read the host: in graph mode the history length lives in an int32 device tensor
(``length_dev``) that the kernels read and the append advances, the capacity is reserved up front (no growth
inside a graph) and the attention grid is fixed (``graph_splits``). The host mirror ``length`` is advanced by the
graph runner (:class:`~kvquant_hf.cuda_graph.CUDAGraphDecoder`) after each replay.
"""

from __future__ import annotations

import torch

from .errors import BackendUnavailableError, KVQuantError


class GraphDecodeState:
    """CUDA-graph part of ``KVQuantLayer``: entering and leaving graph mode, and appends at the device length."""

    graph_mode = False
    length_dev = None  # int32 [1] on the layer's device while in graph mode
    attend_len_dev = None  # int32 [1]: packed tokens the attention reads (with a recent window)
    # False: length_dev is shared and advanced once per step by its owner (CUDAGraphDecoder), not by the layer
    _advance_length = True

    def enter_graph_mode(self, extra_tokens: int, num_splits: int | None = None,
                         length_dev: torch.Tensor | None = None) -> None:
        """Make decode steps capturable: capacity for ``extra_tokens`` more tokens reserved now (no growth later),
        history length mirrored in an int32 device tensor that the kernels read (and this layer's append advances,
        unless the tensor is shared: see ``length_dev``).

        ``length_dev``: an int32 ``[1]`` tensor on this layer's device shared with other layers of the same length
        (set to this layer's length here). The layer then only reads it; whoever shares it advances it once per
        step after the last layer (:class:`~kvquant_hf.cuda_graph.CUDAGraphDecoder` does: one kernel per step
        instead of one per layer).
        """
        if not self.is_initialized or self.length == 0 or self.n_sink < self.config.sink_tokens:
            raise KVQuantError(
                f"layer {self.layer_idx}: CUDA-graph decode starts after the prompt is in the cache (prefill first)."
            )
        if self.backend != "triton" or not self.triton_quantize:
            raise BackendUnavailableError(
                f"layer {self.layer_idx}: CUDA-graph decode needs the Triton backend on CUDA (this layer uses "
                f"{self.backend!r}); use backend='auto' or 'triton' on a GPU, or turn cuda_graph off."
            )
        self.ensure_capacity(self.length + int(extra_tokens))
        if num_splits is None:
            from .kernels import default_num_splits

            num_splits = default_num_splits(self.batch_size, self.num_heads, 1, self.capacity, self.device)
        self.graph_splits = int(num_splits)
        if length_dev is None:
            self.length_dev = torch.tensor([self.length], dtype=torch.int32, device=self.device)
        else:
            if length_dev.shape != (1,) or length_dev.dtype != torch.int32 or length_dev.device != self.device:
                raise KVQuantError(
                    f"layer {self.layer_idx}: a shared length_dev must be an int32 tensor of shape (1,) on "
                    f"{self.device}; got {length_dev.dtype} {tuple(length_dev.shape)} on {length_dev.device}."
                )
            self.length_dev = length_dev
            self.length_dev.fill_(self.length)
        self._advance_length = length_dev is None
        self.sync_attended_length()
        self.sinks_valid()  # known on the host before capture (it cannot sync)
        self.graph_mode = True
        self.window_all_valid = None
        self.window_valid()  # (the whole ring in graph mode: unfilled slots are masked)

    def exit_graph_mode(self) -> None:
        """Back to host-driven appends (the host length is the truth again)."""
        self.graph_mode = False
        self.length_dev = self.attend_len_dev = None
        self.window_all_valid = None

    def sync_device_length(self) -> None:
        """Copy the host length to the device mirror (after crop/rewind on the host)."""
        if self.length_dev is not None:
            self.length_dev.fill_(self.length)
            self.sync_attended_length()

    def append_history_graph(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                             positions_written: bool = False) -> None:
        """Append at the device-side length without touching the host (graph capture and replay)."""
        n = k.shape[2]
        self.quantize_kv(k, v, self.length_dev)
        if not positions_written:
            idx = self.length_dev.long() if n == 1 else self.length_dev.long() + torch.arange(n, device=self.device)
            self.positions.index_copy_(1, idx, positions.to(torch.int32))
        if self._advance_length:  # (a shared length is advanced once per step by its owner)
            self.length_dev.add_(n)

    # ---------------------------------------------------------------- pickling
    def __getstate__(self) -> dict:
        """Pickled state without graph mode: a captured graph and its device-side length belong to one run (the
        host length is the truth between steps), so a loaded layer starts in host-driven mode."""
        parent = getattr(super(), "__getstate__", None)  # (object.__getstate__ from Python 3.11)
        state = dict(parent() if parent is not None else self.__dict__)
        for name in ("graph_mode", "length_dev", "attend_len_dev", "_advance_length"):
            state.pop(name, None)
        return state
