"""Attention routing of one :class:`~kvquant_hf.cache.KVQuantLayer`: which code computes ``attend``.

The new tokens of a call attend exactly and causally to each other and to the sink (the *exact block*), and to
the packed history through its quantized form (RoPE applied on the fly from the stored positions). Three paths:

* **Triton** (CUDA, power-of-two ``head_dim >= 32``): one kernel builds the exact block
  (:func:`kvquant_hf.kernels.decode_prep`), one attends (:func:`kvquant_hf.kernels.packed_attention_triton`);
* **prefill** (long query chunks over a non-empty history, ``prefill_attention``): dequantize the history in
  blocks and attend with the fused SDPA (:func:`kvquant_hf.attention.packed_attention_prefill`);
* **torch** (anywhere): :func:`kvquant_hf.attention.packed_attention_torch`, block by block over the history.

The history columns of the attention mask are not read (the cache is not stored in arrival order for left-padded
rows): padding is tracked from the first call (the diagonal of its mask) and the sliding window is applied from
the stored positions. The kernels are imported inside the functions that launch them, so ``import kvquant_hf``
does not import Triton.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from .attention import fused_lse_available, packed_attention_prefill, packed_attention_torch
from .errors import BackendUnavailableError, CacheMismatchError, KVQuantError
from .layer_api import AttendInputs, apply_rope

#: query rows (per KV head: q_len) from which a call counts as a prefill chunk for ``prefill_attention``
PREFILL_MIN_ROWS = 16
#: smallest head_dim the Triton path runs (the kernels accept 16, but their no-``tl.dot`` path for
#: ``head_dim < 32`` disagrees with the torch reference on an H200, so it is not used)
MIN_TRITON_HEAD_DIM = 32


# --------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------
def kernels_unavailable_reason() -> str:
    """Why the Triton kernels cannot be imported here (``""`` when they can; they are imported then)."""
    if importlib.util.find_spec("triton") is None:
        return "the `triton` package is not installed"
    try:
        from .kernels import packed_attention_triton  # noqa: F401
    except ImportError as exc:
        return f"`kvquant_hf.kernels` cannot be imported ({exc})"
    return ""


def resolve_backend(backend: str, device: torch.device, head_dim: int | None = None) -> str:
    """Map ``config.backend`` to the backend used on ``device``: ``"torch"`` or ``"triton"``.

    ``"auto"`` picks Triton on CUDA when the kernels import and ``head_dim`` is a power of two >= 32, torch
    otherwise; ``"triton"`` where it cannot run raises :class:`~kvquant_hf.errors.BackendUnavailableError`.
    """
    if backend == "torch":
        return "torch"
    if device.type != "cuda":
        reason = f"the cache lives on {device.type!r}, and the Triton kernels need a CUDA device"
    elif head_dim is not None and (head_dim < MIN_TRITON_HEAD_DIM or head_dim & (head_dim - 1)):
        reason = f"the Triton path needs a power-of-two head_dim >= {MIN_TRITON_HEAD_DIM}, the model has {head_dim}"
    else:
        reason = kernels_unavailable_reason()
    if not reason:
        return "triton"
    if backend == "triton":
        raise BackendUnavailableError(
            f"backend='triton' cannot run here: {reason}. Use backend='torch' (or 'auto', which falls back to torch)."
        )
    return "torch"


def mask_to_bool(mask: torch.Tensor) -> torch.Tensor:
    """True = attend, for bool masks and additive float masks (0 = attend, large negative = masked)."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask > torch.finfo(mask.dtype).min / 2
    return mask != 0


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device while Triton launches there (Triton launches on the current
    device; with an accelerate ``device_map`` a layer's cache lives on another GPU than the current one)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class AttentionRouting:
    """Attention part of ``KVQuantLayer``: :meth:`attend` checks the inputs, builds the exact block and its mask,
    runs the backend's attention over ``[sink | packed history | new tokens]`` and stores the new tokens."""

    def attend(self, inputs: AttendInputs) -> torch.Tensor:
        """Attend ``inputs.query`` over ``[sink | packed history | new tokens]``, then store the new tokens.

        Args:
            inputs (`AttendInputs`): queries ``[B, Hq, L, D]`` (rotated), new pre-RoPE keys and values
                ``[B, H, L, D]``, positions ``[B, L]``, RoPE, the model's attention mask, scaling, sliding window.

        Returns:
            `torch.Tensor`: ``[B, L, Hq, D]`` in the query dtype.
        """
        q, k, v = inputs.query, inputs.key, inputs.value
        self._check_inputs(k, v)
        b, _, n_new, _ = k.shape
        window = inputs.sliding_window
        # Triton backend: one kernel makes the exact block (kvquant_hf.kernels.exact_block.decode_prep); the guard goes
        # into it unless nonfinite="error" must raise before anything is stored (a host check, eager mode only)
        fused = self.backend == "triton" and window is None
        guard_in_kernel = fused and (self.graph_mode or self.config.nonfinite != "error")
        if not guard_in_kernel:
            k, v = self.check_finite(k, v, inputs.positions)
        past = self.n_sink + self.length
        positions = inputs.positions.to(self.device, torch.int64).expand(b, n_new)
        if self.graph_mode and n_new == 1 and window is None:
            # CUDA-graph decode: the one new token sees itself, the padding of the prompt is in hist_start and
            # sink_valid (recorded at prefill), and the replayed mask is not read anyway (transformers builds a 4D
            # mask while a graph is captured); no mask kernels in the graph
            new_visible, real = None, None
        else:
            new_visible, real = self.new_block_mask(inputs.attention_mask, past, n_new, positions, window)
            if real is not None and (n_new > 1 or not self.sinks_valid()):  # a prefill chunk, or sinks to fill
                self.check_left_padding(real)
        # CUDA-graph decode (the sink is full, every new token goes to the history): the kernel also writes the
        # positions of the new tokens at the device-side length
        write_pos = fused and self.graph_mode

        if fused:
            from .kernels import decode_prep

            cos, sin = inputs.rope.cos.to(q.dtype), inputs.rope.sin.to(q.dtype)
            with device_guard(self.device):
                q, exact_k, exact_v = decode_prep(
                    q, k, v, cos, sin,
                    self.rotated_sink(inputs.rope) if self.n_exact else None,
                    self.sink_v[:, :, : self.n_exact] if self.n_exact else None,
                    rotate_query=not inputs.query_rotated,
                    counter=self.nonfinite_counter if guard_in_kernel else None,
                    positions=positions if write_pos else None,
                    positions_out=self.positions if write_pos else None,
                    length_dev=self.length_dev if write_pos else None,
                )
            exact_mask = self.exact_mask(new_visible, positions, window, b, n_new)
        else:
            if not inputs.query_rotated:  # what the stock attention forward does, in the model dtype
                q = apply_rope(q, inputs.rope.cos.to(q.dtype), inputs.rope.sin.to(q.dtype))
            exact_k, exact_v, exact_mask = self._exact_block_torch(k, v, inputs.rope, new_visible, positions, window)

        out = self._attention(
            q, exact_k, exact_v, exact_mask,
            scaling=inputs.scaling,
            inv_freq=inputs.rope.inv_freq,
            attention_scaling=inputs.rope.attention_scaling,
            hist_start=self.hist_start if self.has_hist_pad else None,
            q_positions=positions if window is not None else None,
            window=window,
        )
        self.store(k, v, positions, real, inputs.rope, positions_written=write_pos, k_rot=exact_k[:, :, -n_new:])
        return out.transpose(1, 2)

    def _check_inputs(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Shapes, dtype and device of the new keys/values against the cache (initializes it on first use)."""
        if k.dim() != 4 or v.shape != k.shape:
            raise CacheMismatchError(
                f"layer {self.layer_idx}: keys {tuple(k.shape)} and values {tuple(v.shape)} must both be "
                "[batch, kv_heads, seq, head_dim] of the same shape."
            )
        if v.dtype != k.dtype or v.device != k.device:
            raise CacheMismatchError(
                f"layer {self.layer_idx}: keys are {k.dtype} on {k.device} but values are {v.dtype} on {v.device}; "
                "the model's k_proj and v_proj must share a dtype and device."
            )
        b, h, _, d = k.shape
        if not self.is_initialized or (self.length == 0 and self.n_sink == 0 and (b, h, d, k.dtype, k.device) != (
                self.batch_size, self.num_heads, self.head_dim, self.dtype, self.device)):
            self.lazy_initialization(k, v)  # first use, or an empty (reset) cache reused with another shape/dtype
        elif (b, h, d) != (self.batch_size, self.num_heads, self.head_dim):
            raise CacheMismatchError(
                f"layer {self.layer_idx}: new keys have batch/heads/head_dim {(b, h, d)} but the cache holds "
                f"{(self.batch_size, self.num_heads, self.head_dim)}; call cache.reset() or use a new KVQuantCache."
            )
        if k.device != self.device:
            raise CacheMismatchError(
                f"layer {self.layer_idx}: keys arrived on {k.device} but this layer's cache lives on {self.device}; "
                "keep each layer on one device for the whole generation (call cache.reset() before moving the model)."
            )
        if k.dtype != self.dtype:
            raise CacheMismatchError(
                f"layer {self.layer_idx}: keys arrived as {k.dtype} but this layer's cache holds {self.dtype}; "
                "do not change the model dtype mid-generation (call cache.reset() or use a new KVQuantCache)."
            )

    def exact_mask(self, new_visible, positions, window, b: int, n_new: int) -> torch.Tensor | None:
        """Visibility of ``[sink | window | new tokens]`` for the new rows ``[B, L, S + L]`` (None: everything
        visible)."""
        n = self.n_exact
        if not n:
            return new_visible
        if new_visible is None and window is None and self.sinks_valid() and self.window_valid():
            return None
        sink_pos = self.sink_positions[:, :n]
        sink_visible = self.sink_valid[:, None, :n].expand(b, n_new, n)
        if window is not None:
            sink_visible = sink_visible & (positions[:, :, None] - sink_pos[:, None, :].long() < window)
        if new_visible is None:
            new_visible = torch.ones(b, n_new, n_new, dtype=torch.bool, device=self.device)
        return torch.cat([sink_visible, new_visible], dim=-1)

    def _exact_block_torch(self, k, v, rope, new_visible, positions, window):
        """``(exact_k, exact_v, exact_mask)`` with torch ops (the torch backend, and sliding windows)."""
        b, n_new = k.shape[0], k.shape[2]
        # exact block: [sink (rotated on the fly from stored positions) | new tokens (rotated like the model does)]
        # the torch path attends in float32 anyway: rotate in float32 too, so fp16 keys near 65504 cannot overflow
        # in RoPE (the Triton path rotates the exact block in the model dtype, as transformers does)
        rot_dtype = k.dtype if self.backend == "triton" else torch.float32
        k_new_rot = apply_rope(k.to(rot_dtype), rope.cos.to(rot_dtype), rope.sin.to(rot_dtype))
        n = self.n_exact
        if not n:
            return k_new_rot, v, new_visible
        sink_pos = self.sink_positions[:, :n]
        if rot_dtype == self.dtype:  # the sink keys rotated when they arrived (again if the RoPE changed)
            sink_k = self.rotated_sink(rope)
        else:
            cos, sin = rope.cos_sin(sink_pos, dtype=rot_dtype)
            sink_k = apply_rope(self.sink_k[:, :, :n].to(rot_dtype), cos, sin)
        exact_k = torch.cat([sink_k, k_new_rot], dim=2)
        exact_v = torch.cat([self.sink_v[:, :, :n], v], dim=2)
        return exact_k, exact_v, self.exact_mask(new_visible, positions, window, b, n_new)

    def _prefill_path(self, q: torch.Tensor, kwargs: dict) -> bool:
        """Whether this call takes the dequantize-and-attend prefill path (see ``prefill_attention``)."""
        mode = self.config.prefill_attention
        if (mode == "kernel" or self.graph_mode or self.attended_length() == 0 or q.shape[2] < PREFILL_MIN_ROWS
                or kwargs.get("hist_start") is not None or kwargs.get("window") is not None):
            return False
        return mode == "dequant" or (self.backend == "triton" and fused_lse_available(q.device, q.dtype, q.shape[-1]))

    def _attention(self, q, exact_k, exact_v, exact_mask, **kwargs) -> torch.Tensor:
        if self._prefill_path(q, kwargs):
            with device_guard(self.device):
                return packed_attention_prefill(
                    q, self.packed_view(self.attended_length()), exact_k, exact_v, exact_mask, scaling=kwargs["scaling"],
                    inv_freq=kwargs["inv_freq"], attention_scaling=kwargs["attention_scaling"],
                    fused=None if self.device.type == "cuda" else False,
                )
        if self.backend == "triton":
            from .kernels import packed_attention_triton

            mask = exact_mask.contiguous() if exact_mask is not None else None
            if self.graph_mode:
                # fixed grid and a device-side length (the packed tokens older than the window): one captured graph
                # serves every step, so the view spans the whole history
                kwargs.update(length_dev=self.attended_length_dev(), num_splits=self.graph_splits)
                view = self.packed_view()
            else:
                view = self.packed_view(self.attended_length())
            with device_guard(self.device):
                return packed_attention_triton(
                    q.contiguous(), view, exact_k.contiguous(), exact_v.contiguous(), mask, **kwargs
                )
        return packed_attention_torch(q, self.packed_view(self.attended_length()), exact_k, exact_v, exact_mask,
                                      **kwargs)

    def new_block_mask(
        self, mask: torch.Tensor | None, past: int, n_new: int, positions: torch.Tensor, window: int | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Visibility among the new tokens ``[B, L, L]`` (None = all) and which new tokens are real ``[B, L]``."""
        b, dev = self.batch_size, self.device
        real = None
        if mask is None:
            if n_new == 1:
                return None, None
            visible = torch.ones(n_new, n_new, dtype=torch.bool, device=dev).tril().expand(b, n_new, n_new)
        elif mask.dim() == 4:
            # [stored | new] columns (transformers sizes masks with get_mask_sizes), or only the new block's
            # columns (chunked prefill builds [B, 1, chunk, chunk] so no mask grows with the context)
            new_only = mask.shape[-1] == n_new and past > 0
            if (mask.shape[-1] < past + n_new and not new_only) or mask.shape[-2] != n_new:
                raise KVQuantError(
                    f"layer {self.layer_idx}: the attention mask has shape {tuple(mask.shape)} but the cache holds "
                    f"{past} tokens and {n_new} arrive; the mask must cover [stored | new] (the model must use "
                    "cache.get_mask_sizes, as patched models do) or only the new tokens."
                )
            block = mask[:, 0, :, :n_new] if new_only else mask[:, 0, :, past : past + n_new]
            visible = mask_to_bool(block).to(dev).expand(b, n_new, n_new)
            real = torch.diagonal(visible, dim1=-2, dim2=-1)
        elif mask.dim() == 2:
            real = mask_to_bool(mask[:, past : past + n_new]).to(dev).expand(b, n_new)
            causal = torch.ones(n_new, n_new, dtype=torch.bool, device=dev).tril()
            visible = causal & real[:, None, :]
        else:
            raise KVQuantError(
                f"layer {self.layer_idx}: attention masks of shape {tuple(mask.shape)} are not supported; pass a 2D "
                "padding mask [B, kv_len] or a 4D mask [B, 1, q_len, kv_len]."
            )
        if window is not None and (mask is None or mask.dim() == 2):
            visible = visible & (positions[:, :, None] - positions[:, None, :] < window)
        return visible, real
