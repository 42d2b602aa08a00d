"""Offline calibration: activations and Fisher information -> per-layer signposts and key thresholds.

Recipe (KVQuant, arXiv 2401.18079, Section 3.4 and Appendix; see ``docs/method.md``):

1. Cut ``nsamples`` random windows of ``seqlen`` tokens from the calibration text (seeded).
2. For each window run **one** forward and backward pass. Forward hooks on every layer's
   ``self_attn.k_proj`` and ``self_attn.v_proj`` capture the *pre-RoPE* keys and the values; the
   Fisher information of each activation element is the squared gradient of the LM loss (mean token
   NLL over the window) with respect to it. Model parameters never need gradients (the graph is built
   by making the embedding output require grad), and half-precision models backpropagate a scaled loss
   so that small gradients do not underflow (the scale is divided out in float32).
3. The first ``sink_tokens`` tokens of every window are excluded (they stay fp16 in the cache).
4. Memory does not grow with the number of windows: a reservoir sample of at most
   ``max_tokens_per_layer`` token rows (the same token positions for every layer) keeps the K and V rows
   and their Fisher information on CPU in float32.
5. Per layer:

   * **key thresholds** per (kv head, channel) at the ``f/2`` and ``1 - f/2`` quantiles
     (:func:`kvquant_hf.quant.key_thresholds_from_sample`; ``f = 0`` gives min/max);
   * keys are normalized with ``(x - zero) * (1 / scale)`` and only in-range elements
     (``lower <= x <= upper``) enter k-means;
   * values are normalized per token exactly like :func:`kvquant_hf.quant.quantize_values`
     (the ``n_slots = default_outlier_slots(f, head_dim)`` extremes are removed; the per-token scale and
     zero are rounded to the value scale dtype); the removed extremes do not enter k-means;
   * **weighted k-means** in 1-D (scikit-learn ``KMeans`` with ``sample_weight``), ``2**bits`` clusters,
     sorted centroids, separately for K and V. Above ``kmeans_max_points`` points a subsample is drawn
     with probability proportional to the weight (with replacement; the draw counts become the sample
     weights), which preserves the weighted distribution that k-means fits;
   * **Q-Norm** statistics: mean/std of the in-range normalized values and of their nearest-signpost
     versions.

   One capture pass serves every requested bit width.

Fisher weighting modes: ``"fisher"`` (the reference code: weight = F = g**2), ``"fisher_x2"``
(weight = F * s**2 with ``s`` the element's normalization scale, i.e. the Fisher-weighted error measured
in the original activation space, as the paper writes the objective), ``"none"`` (plain k-means; no
backward pass at all).

Example:

```python
>>> from kvquant_hf.calibration import calibrate
>>> from kvquant_hf.signposts import save_signposts
>>> text = open("../shared/data/wikitext-2/valid.tokens.txt", encoding="utf-8").read()
>>> result = calibrate(model, tokenizer, text, bits=(4, 3, 2), nsamples=16, seqlen=2048)
>>> for b, sp in result.items():
...     save_signposts(sp, "signposts/my-model")
```
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import quant
from .calibration_capture import (
    CALIBRATION_DATASETS,
    DEFAULT_MAX_TOKENS_PER_LAYER,
    OFFLINE_TEXT_HINT,
    CalibrationSample,
    capture_calibration_sample,
    find_kv_projections,
    load_calibration_text,
    sample_windows,
    tokenize_calibration_text,
)
from .calibration_checks import KEY_TABLES, VALUE_TABLES, check_calibration_args, check_device, resolve_key_table
from .config import default_outlier_slots
from .errors import KVQuantConfigError
from .models.loading import model_identity
from .signposts import FORMAT_VERSION, KIND, LayerSignposts, Signposts

logger = logging.getLogger(__name__)

DEFAULT_KMEANS_MAX_POINTS = 200_000


def _package_version() -> str:
    import kvquant_hf

    version = getattr(kvquant_hf, "__version__", None)  # kvquant_hf/__init__.py may define it
    if version:
        return str(version)
    try:
        return importlib.metadata.version("kvquant_hf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# per-layer math
# --------------------------------------------------------------------------------------------
def key_thresholds(keys: torch.Tensor, outlier_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``lower, upper [H, D]`` of pre-RoPE key rows ``[n, H, D]`` (quantiles ``f/2``, ``1 - f/2``)."""
    return quant.key_thresholds_from_sample(keys.permute(1, 0, 2).unsqueeze(0), outlier_fraction)


def normalize_keys(
    keys: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize key rows ``[n, H, D]`` per channel like :func:`kvquant_hf.quant.quantize_keys`.

    Returns:
        ``x_norm [n, H, D]`` float32, ``inlier [n, H, D]`` (``lower <= x <= upper``; outliers would be
        stored exactly or clipped), ``scale [H, D]``.
    """
    x = keys.to(torch.float32)
    zero, scale = quant.key_zero_scale(lower, upper)
    x_norm = (x - zero) * (1.0 / scale)
    inlier = (x >= lower.to(torch.float32)) & (x <= upper.to(torch.float32))
    return x_norm, inlier, scale


def normalize_values(
    values: torch.Tensor, n_slots: int, model_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize value vectors ``[..., D]`` per token exactly like :func:`kvquant_hf.quant.quantize_values`.

    Args:
        values: value vectors (any float dtype; converted to float32).
        n_slots: extremes per vector removed as outliers (``a`` from the bottom, ``n_slots - a`` from the
            top, ``a`` minimizing the remaining range, smallest ``a`` on ties).
        model_dtype: the model's dtype, which sets the rounding of the per-token scale and zero.

    Returns:
        ``x_norm [..., D]`` float32, ``inlier [..., D]`` bool (False at the ``n_slots`` removed extremes),
        ``scale [..., 1]`` float32 (the rounded per-token scale).
    """
    x = values.to(torch.float32)
    d = x.shape[-1]
    k = n_slots
    if k >= d:
        raise KVQuantConfigError(f"outlier slots ({k}) must be fewer than head_dim ({d}).")
    sd = quant.value_scale_dtype(model_dtype)
    srt = torch.sort(x, dim=-1, stable=True)
    vals, order = srt.values, srt.indices
    a_best, lo, hi = quant.value_outlier_split(vals, k)  # the value outlier rule
    a_best, lo, hi = a_best.unsqueeze(-1), lo.unsqueeze(-1), hi.unsqueeze(-1)
    smax = torch.finfo(sd).max  # same range arithmetic as quant.quantize_values
    zero = (hi * 0.5 + lo * 0.5).clamp(-smax, smax).to(sd).to(torch.float32)
    scale = (hi * 0.5 - lo * 0.5).clamp(quant.MIN_SCALE, smax).to(sd).to(torch.float32).clamp_min(quant.MIN_SCALE)
    x_norm = (x - zero) * (1.0 / scale)
    pos = torch.arange(d, device=x.device)
    kept_sorted = (pos >= a_best) & (pos <= d - 1 - (k - a_best))
    inlier = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    return x_norm, inlier, scale


def kmeans_subsample(
    x: torch.Tensor, weights: torch.Tensor | None, max_points: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Points and sample weights (float64 numpy) for 1-D weighted k-means, at most ``max_points`` of them.

    Below the limit every point keeps its weight. Above it, points are drawn with replacement with
    probability proportional to their weight and weighted by how often they were drawn (uniformly without
    replacement, unit weights, when ``weights`` is None): the subsample follows the weighted distribution.
    """
    x = x.reshape(-1).to(torch.float32)
    n = int(x.numel())
    if weights is not None:
        weights = weights.reshape(-1).to(torch.float64)
        total = float(weights.sum())
        if not math.isfinite(total) or total <= 0:
            logger.warning("Fisher weights sum to %s; falling back to unweighted k-means for this tensor.", total)
            weights = None
    rng = np.random.default_rng(seed)
    if n <= max_points:
        pts = x.double().numpy()
        w = np.ones(n) if weights is None else (weights / weights.mean()).numpy()
        return pts, w
    if weights is None:
        idx = rng.choice(n, size=max_points, replace=False)
        return x.double().numpy()[idx], np.ones(max_points)
    p = (weights / weights.sum()).numpy()
    draws = rng.choice(n, size=max_points, replace=True, p=p)
    idx, counts = np.unique(draws, return_counts=True)
    return x.double().numpy()[idx], counts.astype(np.float64)


def weighted_kmeans_1d(
    points: np.ndarray, sample_weight: np.ndarray | None, n_clusters: int, seed: int = 0, n_init: int = 3,
    max_iter: int = 100,
) -> torch.Tensor:
    """Sorted float32 centroids ``[n_clusters]`` of 1-D weighted k-means (scikit-learn ``KMeans``).

    With fewer distinct points than clusters the distinct values are completed with points of the uniform
    grid on [-1, 1] so the table always has ``n_clusters`` sorted entries.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    pts = np.asarray(points, dtype=np.float64).reshape(-1)
    distinct = np.unique(pts)
    if distinct.size <= n_clusters:
        grid = np.linspace(-1.0, 1.0, n_clusters)
        fill = [g for g in grid if not np.isclose(distinct, g).any()][: n_clusters - distinct.size]
        return torch.tensor(np.sort(np.concatenate([distinct, fill])), dtype=torch.float32)
    km = KMeans(n_clusters=n_clusters, n_init=n_init, max_iter=max_iter, random_state=seed)
    # 1-D problems are too small for OpenMP: one thread is several times faster than two or more
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="openmp"):
        warnings.simplefilter("ignore")  # ConvergenceWarning on heavily duplicated data
        km.fit(pts.reshape(-1, 1), sample_weight=sample_weight)
    return torch.tensor(np.sort(km.cluster_centers_.reshape(-1)), dtype=torch.float32)


def weighted_kmeans_1d_pinned(
    points: np.ndarray, sample_weight: np.ndarray | None, n_clusters: int, max_iter: int = 300, tol: float = 1e-7,
) -> torch.Tensor:
    """Sorted float32 table ``[n_clusters]`` whose outer entries are pinned at -1 and +1 (the thresholds).

    Weighted 1-D Lloyd iterations (nearest signpost, then weighted mean) that move only the interior
    entries, started from the uniform grid on [-1, 1] (deterministic). Plain k-means pulls the outer
    centroids inward (to about +-0.8 for 3-bit keys), so every in-range element between there and the
    threshold is shrunk; pinning keeps the calibrated range representable while the interior stays
    sensitivity-weighted. An interior entry whose cell is empty keeps its position.
    """
    if n_clusters < 2:
        raise KVQuantConfigError(f"a pinned table needs at least 2 entries, got {n_clusters}.")
    pts = np.asarray(points, dtype=np.float64).reshape(-1)
    w = np.ones_like(pts) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    c = np.linspace(-1.0, 1.0, n_clusters)
    for _ in range(max_iter):
        mids = (c[1:] + c[:-1]) / 2
        cell = np.searchsorted(mids, pts, side="left")  # ties go low, like quant.encode_nearest
        wsum = np.bincount(cell, weights=w, minlength=n_clusters)
        xsum = np.bincount(cell, weights=w * pts, minlength=n_clusters)
        new = c.copy()
        inner = np.arange(1, n_clusters - 1)
        filled = inner[wsum[inner] > 0]
        new[filled] = xsum[filled] / wsum[filled]
        new = np.sort(np.clip(new, -1.0, 1.0))
        done = np.max(np.abs(new - c)) < tol
        c = new
        if done:
            break
    return torch.tensor(c, dtype=torch.float32)


def qnorm_stats(x_in: torch.Tensor, signposts: torch.Tensor) -> torch.Tensor:
    """Q-Norm statistics ``[mu, sd, mu_q, sd_q]`` (float32) of normalized values and their nearest signposts.

    Nearest signpost as in :func:`kvquant_hf.quant.encode_nearest` (``#{m : x > mid_m}``, ties go low).
    """
    x = x_in.reshape(-1).to(torch.float32)
    if x.numel() == 0:
        return torch.tensor([0.0, 1.0, 0.0, 1.0])
    mids = quant.signpost_midpoints(signposts)
    xq = signposts.to(torch.float32)[torch.bucketize(x, mids, right=False)]
    x64, xq64 = x.double(), xq.double()
    return torch.tensor(
        [x64.mean(), x64.std(unbiased=False), xq64.mean(), xq64.std(unbiased=False)], dtype=torch.float32
    )


@dataclass
class _TensorStats:
    """Normalized in-range values of one layer's K or V, their k-means subsample, for all bit widths."""

    x_in: torch.Tensor
    points: np.ndarray
    weights: np.ndarray


def _prepare(x_norm: torch.Tensor, inlier: torch.Tensor, weight: torch.Tensor | None, max_points: int,
             seed: int) -> _TensorStats:
    x_in = x_norm[inlier]
    w_in = weight[inlier] if weight is not None else None
    points, weights = kmeans_subsample(x_in, w_in, max_points, seed)
    return _TensorStats(x_in=x_in, points=points, weights=weights)


def signposts_from_sample(
    sample: CalibrationSample,
    bits: Sequence[int] = (4, 3, 2),
    outlier_fraction: float = 0.01,
    fisher_weighting: str = "fisher",
    seed: int = 0,
    kmeans_max_points: int = DEFAULT_KMEANS_MAX_POINTS,
    kmeans_n_init: int = 3,
    progress: bool = True,
    key_table: str = "auto",
    value_table: str = "kmeans",
) -> dict[int, list[LayerSignposts]]:
    """Per-layer thresholds, weighted k-means signposts and Q-Norm statistics for each bit width.

    ``key_table`` chooses the key tables: ``"auto"`` (uniform at 3 and 4 bits, k-means at 2:
    :func:`~kvquant_hf.calibration_checks.resolve_key_table`), ``"kmeans"`` (the reference recipe), ``"kmeans-pinned"`` (weighted
    k-means with the outer entries pinned at -1 and +1, :func:`weighted_kmeans_1d_pinned`) or ``"uniform"`` (the
    intX grid on [-1, 1]). ``value_table``: ``"kmeans"`` (reference) or ``"uniform"``. Uniform tables let the
    CUDA decode kernel fold the grid into scale and zero instead of looking codes up (its fastest path).
    """
    if key_table not in KEY_TABLES:
        raise KVQuantConfigError(f"key_table={key_table!r} is not supported; choose one of {KEY_TABLES}.")
    if value_table not in VALUE_TABLES:
        raise KVQuantConfigError(f"value_table={value_table!r} is not supported; choose one of {VALUE_TABLES}.")
    h, d = sample.num_kv_heads, sample.head_dim
    n_slots = default_outlier_slots(outlier_fraction, d)
    out: dict[int, list[LayerSignposts]] = {b: [] for b in bits}
    n_layers = len(sample.keys)
    for layer in tqdm(range(n_layers), desc="k-means per layer", disable=not progress):
        k = sample.keys[layer].view(-1, h, d)
        v = sample.values[layer].view(-1, h, d)
        lower, upper = key_thresholds(k, outlier_fraction)
        kx, kin, kscale = normalize_keys(k, lower, upper)
        vx, vin, vscale = normalize_values(v, n_slots, sample.model_dtype)
        kw = vw = None
        if fisher_weighting != "none":
            kw = sample.key_fisher[layer].view(-1, h, d)
            vw = sample.value_fisher[layer].view(-1, h, d)
            if fisher_weighting == "fisher_x2":
                kw = kw * kscale.square()
                vw = vw * vscale.square()
        kstats = _prepare(kx, kin, kw, kmeans_max_points, seed + 2 * layer)
        vstats = _prepare(vx, vin, vw, kmeans_max_points, seed + 2 * layer + 1)
        for b in bits:
            table = resolve_key_table(key_table, b)
            if table == "kmeans":
                ksp = weighted_kmeans_1d(kstats.points, kstats.weights, 2**b, seed, kmeans_n_init)
            elif table == "kmeans-pinned":
                ksp = weighted_kmeans_1d_pinned(kstats.points, kstats.weights, 2**b)
            else:
                ksp = quant.uniform_signposts(b).to(torch.float32)
            if value_table == "kmeans":
                vsp = weighted_kmeans_1d(vstats.points, vstats.weights, 2**b, seed, kmeans_n_init)
            else:
                vsp = quant.uniform_signposts(b).to(torch.float32)
            out[b].append(
                LayerSignposts(
                    key_signposts=ksp,
                    value_signposts=vsp,
                    key_lower=lower.contiguous(),
                    key_upper=upper.contiguous(),
                    key_qnorm=qnorm_stats(kstats.x_in, ksp),
                    value_qnorm=qnorm_stats(vstats.x_in, vsp),
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def calibrate(
    model: nn.Module,
    tokenizer: Any,
    data: str | Sequence[str] | torch.Tensor | Sequence[int],
    bits: int | Sequence[int] = (4, 3, 2),
    outlier_fraction: float = 0.01,
    sink_tokens: int = 1,
    nsamples: int = 16,
    seqlen: int = 2048,
    seed: int = 0,
    fisher_weighting: str = "fisher",
    max_tokens_per_layer: int = DEFAULT_MAX_TOKENS_PER_LAYER,
    device: str | torch.device | None = None,
    progress: bool = True,
    kmeans_max_points: int = DEFAULT_KMEANS_MAX_POINTS,
    kmeans_n_init: int = 3,
    source_info: dict[str, Any] | None = None,
    key_table: str = "auto",
    value_table: str = "kmeans",
) -> dict[int, Signposts]:
    """Calibrate KVQuant signposts, key thresholds and Q-Norm statistics for a model.

    Args:
        model (`PreTrainedModel`): a causal LM with separate `k_proj`/`v_proj` (Llama, Mistral, Qwen2...),
            any dtype, on any device or spread with an accelerate `device_map`.
        tokenizer: its tokenizer (unused when `data` is token ids).
        data: calibration text (`str` or list of texts joined with blank lines), a 1-D token stream
            (`torch.LongTensor [n]` or list of ints) from which windows are drawn, or pre-cut windows
            `torch.LongTensor [nsamples, seqlen]` used as they are.
        bits (`int` or sequence): bit widths to produce (2, 3, 4); one capture pass serves them all.
        outlier_fraction (`float`): dense-and-sparse fraction `f` in [0, 0.1]; key thresholds are the `f/2`
            and `1 - f/2` quantiles per channel, values drop `ceil(f * head_dim)` extremes per token.
        sink_tokens (`int`): leading tokens of each window excluded from calibration.
        nsamples (`int`), seqlen (`int`): number and length of the random windows.
        seed (`int`): seeds the windows, the reservoir, the subsampling and k-means.
        fisher_weighting (`str`): "fisher" (F), "fisher_x2" (F * scale**2) or "none".
        max_tokens_per_layer (`int`): token rows kept per layer (reservoir sample); CPU memory is about
            `16 * max_tokens_per_layer * num_layers * num_kv_heads * head_dim` bytes.
        device (`str`, *optional*): move the model there first (not allowed with a `device_map`); default:
            where the model already is.
        progress (`bool`): tqdm progress bars.
        kmeans_max_points (`int`): k-means points per layer and tensor (weighted subsample above).
        kmeans_n_init (`int`): k-means restarts.
        source_info (`dict`, *optional*): recorded in `metadata.calibration` (e.g. `{"text_file": path}`).
        key_table (`str`): key tables: "auto" (default: uniform at 3 and 4 bits, k-means at 2 bits), "kmeans" (the
            paper's recipe), "kmeans-pinned" (outer entries pinned at the thresholds, interior weighted k-means) or
            "uniform"; each bit width's table is recorded in `metadata.calibration.key_table`.
        value_table (`str`): value tables: "kmeans" (default) or "uniform"; recorded in
            `metadata.calibration.value_table` when not the default. With uniform key and value tables the CUDA
            decode kernel takes its fastest path (no table lookups).

    Returns:
        `dict[int, Signposts]`: one entry per bit width (not yet saved; see
        :func:`kvquant_hf.signposts.save_signposts`).
    """
    t0 = time.perf_counter()
    windows_given = (isinstance(data, torch.Tensor) and data.dim() == 2) or (  # pre-cut windows fix nsamples, seqlen
        isinstance(data, Sequence) and len(data) > 0 and isinstance(data[0], (Sequence, torch.Tensor))
        and not isinstance(data[0], str)
    )
    bits_list = check_calibration_args(
        bits, outlier_fraction, sink_tokens, None if windows_given else nsamples, None if windows_given else seqlen,
        seed, fisher_weighting, max_tokens_per_layer, kmeans_max_points, key_table, value_table,
    )
    check_device(device)
    if device is not None:
        if getattr(model, "hf_device_map", None):
            raise KVQuantConfigError("device=... cannot move a model loaded with a device_map; pass device=None.")
        model.to(device)

    info: dict[str, Any] = dict(source_info or {})
    if isinstance(data, str) or (isinstance(data, Sequence) and data and isinstance(data[0], str)):
        text = data if isinstance(data, str) else "\n\n".join(data)
        info["text_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
        ids = tokenize_calibration_text(tokenizer, text)
        windows, starts = sample_windows(ids, nsamples, seqlen, seed)
    else:
        ids = torch.as_tensor(data, dtype=torch.long)
        info["tokens_sha256"] = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
        if ids.dim() == 2:
            windows, starts = ids, None
            nsamples, seqlen = ids.shape
        elif ids.dim() == 1:
            windows, starts = sample_windows(ids, nsamples, seqlen, seed)
        else:
            raise KVQuantConfigError(f"token ids must be 1-D [n] or 2-D [nsamples, seqlen], got {tuple(ids.shape)}.")
    info["num_tokens_text"] = int(ids.numel())

    sample = capture_calibration_sample(
        model, windows, sink_tokens=sink_tokens, fisher_weighting=fisher_weighting,
        max_tokens_per_layer=max_tokens_per_layer, seed=seed, progress=progress,
    )
    t_capture = time.perf_counter() - t0
    per_bits = signposts_from_sample(
        sample, bits_list, outlier_fraction=outlier_fraction, fisher_weighting=fisher_weighting, seed=seed,
        kmeans_max_points=kmeans_max_points, kmeans_n_init=kmeans_n_init, progress=progress, key_table=key_table,
        value_table=value_table,
    )
    duration = time.perf_counter() - t0
    ident = model_identity(model)
    calibration = {
        **info,
        "nsamples": int(nsamples),
        "seqlen": int(seqlen),
        "seed": int(seed),
        "window_starts": starts,
        "max_tokens_per_layer": int(max_tokens_per_layer),
        "tokens_per_layer": sample.num_tokens,
        "tokens_seen": sample.tokens_seen,
        "kmeans_max_points": int(kmeans_max_points),
        "model_dtype": str(sample.model_dtype).replace("torch.", ""),
        "capture_s": round(t_capture, 2),
        "duration_s": round(duration, 2),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kvquant_hf_version": _package_version(),
    }
    if value_table != "kmeans":
        calibration["value_table"] = value_table
    result = {}
    for b in bits_list:
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "model": ident,
            "bits": b,
            "outlier_fraction": float(outlier_fraction),
            "outlier_slots_default": default_outlier_slots(outlier_fraction, ident["head_dim"]),
            "sink_tokens": int(sink_tokens),
            "fisher_weighting": fisher_weighting,
            "calibration": {**calibration, "key_table": resolve_key_table(key_table, b)},
            "files": {},
        }
        result[b] = Signposts(layers=per_bits[b], metadata=meta)
    return result


__all__ = [
    "CALIBRATION_DATASETS",
    "DEFAULT_KMEANS_MAX_POINTS",
    "DEFAULT_MAX_TOKENS_PER_LAYER",
    "KEY_TABLES",
    "OFFLINE_TEXT_HINT",
    "VALUE_TABLES",
    "CalibrationSample",
    "calibrate",
    "capture_calibration_sample",
    "find_kv_projections",
    "key_thresholds",
    "kmeans_subsample",
    "load_calibration_text",
    "normalize_keys",
    "normalize_values",
    "qnorm_stats",
    "sample_windows",
    "signposts_from_sample",
    "tokenize_calibration_text",
    "weighted_kmeans_1d",
    "weighted_kmeans_1d_pinned",
]
