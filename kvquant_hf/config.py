"""`KVQuantConfig`: every knob of the quantized cache, validated with clear errors."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import KVQuantConfigError

SUPPORTED_BITS = (2, 3, 4)
SUPPORTED_BACKENDS = ("auto", "torch", "triton")
NONFINITE_POLICIES = ("error", "zero")
PREFILL_ATTENTION_MODES = ("auto", "kernel", "dequant")
MAX_SINK_TOKENS = 64
MAX_RECENT_WINDOW = 4096
#: exact recent tokens by default (KIVI's and QuantizedCache's residual length too)
DEFAULT_RECENT_WINDOW = 128
MAX_OUTLIER_SLOTS = 16


def _is_int(value: Any) -> bool:
    """A real integer (``True``/``False`` and floats are rejected)."""
    return isinstance(value, int) and not isinstance(value, bool)


def default_outlier_slots(outlier_fraction: float, head_dim: int) -> int:
    """Outlier slots per token and head for a given fraction: ceil(fraction * head_dim), 0 for 0%.

    Slots are preallocated per token (as in the reference deployment), so the fraction sets the
    storage budget: 1% of a 64-channel head is one slot, of a 128-channel head two.
    """
    if outlier_fraction <= 0:
        return 0
    return max(1, math.ceil(outlier_fraction * head_dim - 1e-9))


@dataclass
class KVQuantConfig:
    """Configuration of a `KVQuantCache`.

    Args:
        bits (`int`): bits per key/value code, one of 2, 3, 4 (nuqX).
        key_bits / value_bits (`int`, optional): override `bits` for keys or values.
        outlier_fraction (`float`): fraction of values stored exactly (dense-and-sparse), in [0, 0.1].
        outlier_slots (`int`, optional): exact slots per token and head (default
            `ceil(outlier_fraction * head_dim)`); more outliers than slots are clipped and counted.
        sink_tokens (`int`): first tokens of each sequence kept exact (attention sink), 0..64.
        recent_window (`int`): the last ``recent_window`` tokens of each sequence are also kept exact, in the model
            dtype (a ring next to the sink); every token is packed when it arrives, and a query attends to the
            packed form only of tokens older than the window. 0 keeps no window. After ``crop``, tokens that had
            already left the window come back to it dequantized.
        qnorm (`bool`): apply Q-Norm (calibrated mean/std correction folded into the lookup table).
        backend (`str`): "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
        block_size (`int`): capacity grows in blocks of this many tokens.
        cuda_graph (`bool`): in ``generate``, capture one decode step in a CUDA graph after the prefill and
            replay it for every new token (CUDA + Triton only; no padding changes between steps). Removes the
            per-kernel launch overhead that dominates a transformers decode step on a fast GPU.
        fused_norms (`bool`): in ``generate``, compute the model's RMSNorm modules (Llama/Mistral) with one Triton
            kernel each on CUDA instead of about eight torch kernels (:mod:`kvquant_hf.models.norms`; the same
            roundings, the float32 variance summed in another order). Fewer launches per decode step; off by
            default because it changes the model, not only the cache.
        fused_projections (`bool`): in ``generate``, compute q/k/v with one GEMV and gate/up with one GEMV in every
            Llama/Mistral layer, and ``silu(gate) * up`` with one Triton kernel on CUDA
            (:mod:`kvquant_hf.models.projections`; the original weights become views of the fused ones, no extra
            memory). Fewer and larger GEMVs per decode step; off by default because the GEMM library may sum the
            larger matrix in another order, and the SiLU·mul kernel's exp is not torch's (last-bit differences).
            Training (autograd on) takes the stock ops; weights replaced after fusing (``model.to``,
            ``load_state_dict(assign=True)``) drop the fusion with a warning.
        prefill_chunk_size (`int`): in ``generate``, prompts longer than this are prefilled in chunks of this many
            tokens; each chunk attends to the packed earlier chunks, so the prompt's fp K/V never exist at once
            (0 = one call for the whole prompt).
        prefill_attention (`str`): how a prefill chunk (16+ query rows) attends to the packed history.
            ``"auto"`` (default): on CUDA with the Triton backend, a history every row sees in full (no left
            padding, no sliding window) is dequantized in 64K-token blocks into the model dtype by one Triton pass
            and attended with PyTorch's cuDNN or FlashAttention-2 kernel (fp16/bf16; memory-efficient attention
            for float32; ``kvquant_hf.attention.PREFILL_FUSED_ORDER``), merged by log-sum-exp with the chunk's own
            causal block; otherwise the split-K kernel (the torch path on CPU). ``"kernel"``: always the split-K
            kernel (it re-reads the packed history for every block of query rows: 4.7x slower at 32K on an H200,
            10.4 s against 2.2 s; ``benchmarks/prefill.py``). ``"dequant"``: the dequantize-and-attend path
            wherever it applies (float32 math off CUDA).
        capacity_check (`bool`): in ``generate``, refuse (``CapacityError``) a request whose cache cannot fit in
            the free GPU memory (on CPU: the host's available memory) according to :func:`kvquant_hf.plan_capacity`,
            before allocating anything.
        signposts (`str`, optional): folder written by `calibrate.py` (its `nuqX` subfolder or the
            parent holding `nuq{bits}`); None means uncalibrated (NormalFloat table, key ranges
            taken from the prompt).
        nonfinite (`str`): what to do with NaN/Inf in new keys or values. ``"error"`` (default): raise
            :class:`~kvquant_hf.errors.KVQuantNumericalError` naming the layer, rows and positions; nothing of
            that forward call stays in the cache (layers that already stored it are rolled back; in ``generate``'s
            chunked prefill, the earlier chunks of the prompt too).
            ``"zero"``: every token whose key or value (any head) is not finite is stored, and attended to, as
            all-zero K and V in every head; other tokens and the per-channel state are untouched; the count is
            ``memory_stats()["n_nonfinite"]``. In CUDA-graph decode both policies contain on the device; with
            ``"error"`` the decoder then rolls the step back and raises.
    """

    bits: int = 4
    key_bits: int | None = None
    value_bits: int | None = None
    outlier_fraction: float = 0.01
    outlier_slots: int | None = None
    sink_tokens: int = 1
    recent_window: int = DEFAULT_RECENT_WINDOW
    qnorm: bool = False
    backend: str = "auto"
    block_size: int = 256
    signposts: str | None = None
    cuda_graph: bool = False
    fused_norms: bool = False
    fused_projections: bool = False
    prefill_chunk_size: int = 4096
    capacity_check: bool = True
    prefill_attention: str = "auto"
    nonfinite: str = "error"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.key_bits is None:
            self.key_bits = self.bits
        if self.value_bits is None:
            self.value_bits = self.bits
        for name in ("bits", "key_bits", "value_bits"):
            value = getattr(self, name)
            if not _is_int(value) or value not in SUPPORTED_BITS:
                raise KVQuantConfigError(
                    f"{name}={value!r} is not supported; choose one of {SUPPORTED_BITS} (nuq2, nuq3, nuq4)."
                )
        if (isinstance(self.outlier_fraction, bool) or not isinstance(self.outlier_fraction, (int, float))
                or not 0.0 <= self.outlier_fraction <= 0.1):
            raise KVQuantConfigError(
                f"outlier_fraction={self.outlier_fraction!r} is out of range; use a fraction in [0, 0.1] "
                "(0.01 means 1% of values are stored exactly)."
            )
        if self.outlier_slots is not None and (
            not _is_int(self.outlier_slots) or not 0 <= self.outlier_slots <= MAX_OUTLIER_SLOTS
        ):
            raise KVQuantConfigError(
                f"outlier_slots={self.outlier_slots!r} is out of range; use an integer in [0, {MAX_OUTLIER_SLOTS}] "
                "or None for ceil(outlier_fraction * head_dim)."
            )
        if not _is_int(self.sink_tokens) or not 0 <= self.sink_tokens <= MAX_SINK_TOKENS:
            raise KVQuantConfigError(
                f"sink_tokens={self.sink_tokens!r} is out of range; use an integer in [0, {MAX_SINK_TOKENS}]."
            )
        if not _is_int(self.recent_window) or not 0 <= self.recent_window <= MAX_RECENT_WINDOW:
            raise KVQuantConfigError(
                f"recent_window={self.recent_window!r} is out of range; use an integer in [0, {MAX_RECENT_WINDOW}] "
                "(tokens kept exact at the end of each sequence; 0 for none)."
            )
        if not isinstance(self.backend, str) or self.backend not in SUPPORTED_BACKENDS:
            raise KVQuantConfigError(
                f"backend={self.backend!r} is not supported; choose one of {SUPPORTED_BACKENDS}."
            )
        if not _is_int(self.block_size) or self.block_size < 16 or self.block_size % 16:
            raise KVQuantConfigError(
                f"block_size={self.block_size!r} is invalid; use a positive multiple of 16 (default 256)."
            )

        if not _is_int(self.prefill_chunk_size) or self.prefill_chunk_size < 0:
            raise KVQuantConfigError(
                f"prefill_chunk_size={self.prefill_chunk_size!r} is invalid; use a positive number of tokens "
                "(or 0 to prefill the whole prompt in one call)."
            )
        if not isinstance(self.prefill_attention, str) or self.prefill_attention not in PREFILL_ATTENTION_MODES:
            raise KVQuantConfigError(
                f"prefill_attention={self.prefill_attention!r} is not supported; choose one of "
                f"{PREFILL_ATTENTION_MODES}."
            )
        if not isinstance(self.capacity_check, bool):
            raise KVQuantConfigError(f"capacity_check={self.capacity_check!r} must be True or False.")
        if not isinstance(self.cuda_graph, bool):
            raise KVQuantConfigError(f"cuda_graph={self.cuda_graph!r} must be True or False.")
        if not isinstance(self.fused_norms, bool):
            raise KVQuantConfigError(f"fused_norms={self.fused_norms!r} must be True or False.")
        if not isinstance(self.fused_projections, bool):
            raise KVQuantConfigError(f"fused_projections={self.fused_projections!r} must be True or False.")
        if not isinstance(self.qnorm, bool):
            raise KVQuantConfigError(f"qnorm={self.qnorm!r} must be True or False.")
        if not isinstance(self.nonfinite, str) or self.nonfinite not in NONFINITE_POLICIES:
            raise KVQuantConfigError(
                f"nonfinite={self.nonfinite!r} is not supported; choose one of {NONFINITE_POLICIES} ('error' raises "
                "KVQuantNumericalError on NaN/Inf keys or values, 'zero' stores such tokens as zeros)."
            )
        if self.signposts is not None and not (
            isinstance(self.signposts, str) or hasattr(self.signposts, "__fspath__")
            or hasattr(self.signposts, "layers")
        ):
            raise KVQuantConfigError(
                f"signposts={type(self.signposts).__name__} is not supported; pass the folder written by calibrate.py "
                "(a str or path), a loaded Signposts, or None (uncalibrated)."
            )

    def slots_for(self, head_dim: int) -> int:
        """Outlier slots per token and head for this head_dim."""
        if self.outlier_slots is not None:
            return self.outlier_slots
        return default_outlier_slots(self.outlier_fraction, head_dim)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> KVQuantConfig:
        """Build from a `cache_config` dict; unknown keys raise an error listing the allowed ones."""
        if isinstance(values, KVQuantConfig):
            return values
        if not isinstance(values, dict):
            raise KVQuantConfigError(
                f"cache_config must be a dict or a KVQuantConfig, got {type(values).__name__}."
            )
        allowed = [f.name for f in fields(cls) if f.name != "extra"]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise KVQuantConfigError(
                f"unknown cache_config key(s) {unknown}; allowed keys are {allowed}."
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra", None)
        return out
