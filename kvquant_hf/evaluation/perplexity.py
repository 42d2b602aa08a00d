"""Perplexity of a causal LM with a quantized KV cache (simulated or real), WikiText-2 protocol.

Protocol (the one KVQuant/GPTQ use): tokenize the whole text once, cut it into non-overlapping windows of
``seqlen`` tokens (the last partial window is dropped), score every token of every window but the first
(next-token NLL), and report ``PPL = exp(mean token NLL over all windows)``.

Caches:

* ``simulated`` (default): :class:`kvquant_hf.simulated.SimulatedQuantCache`, one forward per window.
  Token ``i`` attends to the quantized K/V of tokens ``j < i`` and to its own exact K/V, which is what
  token-by-token decoding through the real cache computes.
* ``real``: :class:`kvquant_hf.cache.KVQuantCache` (nuq methods only): per window, an optional prefix of
  ``prefill`` tokens in one call, then one decode step per token, so every scored token attends to the
  packed history exactly as in generation.

Example:
    >>> from kvquant_hf.evaluation import evaluate_perplexity
    >>> res = evaluate_perplexity(model, tokenizer, ["fp16", "nuq4", "int4"], text_file="test.raw.txt",
    ...                           seqlen=2048, windows=8, signposts="/work/signposts/smollm2-1pct")  # doctest: +SKIP
    >>> res["nuq4"]["ppl"]  # doctest: +SKIP

Command line::

    python -m kvquant_hf.evaluation.perplexity --model smollm2 --text-file test.raw.txt --seqlen 2048 \\
        --windows 8 --methods fp16 nuq4 int4 kivi4 --signposts /work/signposts/smollm2-1pct --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from ..cli_help import DefaultsHelpFormatter
from ..config import default_outlier_slots
from ..errors import KVQuantConfigError, KVQuantError
from ..generation import cache_kwarg_name
from ..models import patch_model
from ..simulated import (
    METHOD_NAMES,
    MethodSpec,
    NuqLayerParams,
    build_simulated_cache,
    nuq_params_from_signposts,
    parse_method,
)
from .quantized_cache_baseline import (DEFAULT_WINDOW_BATCH, QUANTIZED_CACHE_NAMES, QuantizedCacheRunner,
                                       QuantizedCacheSpec, any_avg_bits, is_quantized_cache_method,
                                       parse_quantized_cache_method)

DEFAULT_METHODS = ("fp16", "nuq4", "nuq3", "nuq2", "int4", "int3", "int2", "kivi4", "kivi2")
CACHE_KINDS = ("simulated", "real")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids ``[N]`` (int64) of the whole text, with the tokenizer's default special tokens.

    For the SmolLM2 tokenizer no BOS is added, so this is the plain token stream.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids.reshape(-1).to(torch.long)


def load_token_ids(tokenizer_or_ids: Any, text: str | None = None, text_file: str | None = None) -> torch.Tensor:
    """``[N]`` int64 ids from a tensor/list of ids, or from a tokenizer plus ``text`` or ``text_file``."""
    if isinstance(tokenizer_or_ids, torch.Tensor):
        return tokenizer_or_ids.reshape(-1).to(torch.long)
    if isinstance(tokenizer_or_ids, (list, tuple)):
        return torch.tensor(tokenizer_or_ids, dtype=torch.long).reshape(-1)
    if text is None:
        if text_file is None:
            raise KVQuantConfigError("pass token ids, or a tokenizer together with text= or text_file=.")
        if not os.path.isfile(text_file):
            raise KVQuantConfigError(f"text file {text_file!r} does not exist; pass the path of the evaluation text.")
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
    return tokenize_text(tokenizer_or_ids, text)


def make_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[W, seqlen]`` (first ``windows`` of them if given; partial tail dropped)."""
    if seqlen < 2:
        raise KVQuantConfigError(f"seqlen={seqlen} is too short; use at least 2 tokens (2048 for the paper protocol).")
    n = ids.numel() // seqlen
    if n == 0:
        raise KVQuantConfigError(f"the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}.")
    if windows is not None:
        if windows < 1:
            raise KVQuantConfigError(f"windows={windows} must be >= 1 (or None for all {n}).")
        n = min(n, windows)
    return ids[: n * seqlen].reshape(n, seqlen)


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"))


@torch.no_grad()
def score_window_simulated(model: Any, window: torch.Tensor, cache: Any, prefill: int = 0) -> tuple[float, int]:
    """Sum of next-token NLL over one window ``[L]`` through a simulated ``cache``; ``(nll_sum, tokens)``.

    One forward for the whole window (``prefill <= 1``), or two: the first ``prefill`` tokens (which then
    attend to each other exactly, as a prompt does in the real cache), then the rest in one call (each token
    attends to the quantized prompt and earlier tokens and to itself exactly, which equals decoding them one
    by one).
    """
    ids = window.reshape(1, -1).to(_model_device(model))
    kw = cache_kwarg_name(model)
    n = ids.shape[1]
    if prefill <= 1 or prefill >= n:
        logits = model(input_ids=ids, use_cache=True, **{kw: cache}).logits[0]
    else:
        cache.set_within_call("exact")
        first = model(input_ids=ids[:, :prefill], use_cache=True, **{kw: cache}).logits[0]
        cache.set_within_call("quantized")
        pos = torch.arange(prefill, n, device=ids.device)[None]
        rest = model(input_ids=ids[:, prefill:], position_ids=pos, use_cache=True, **{kw: cache}).logits[0]
        logits = torch.cat([first, rest], 0)
    return _nll_sum(logits[:-1], ids[0, 1:]), n - 1


@torch.no_grad()
def score_window_incremental(
    model: Any, window: torch.Tensor, cache: Any, prefill: int = 0, chunk: int = 1
) -> tuple[float, int]:
    """Like :func:`score_window_simulated` but as in generation: ``prefill`` tokens in one call, then calls of
    ``chunk`` tokens through ``cache``: ``chunk=1`` is token-by-token decoding (every scored token attends to the
    stored history), ``chunk > 1`` is chunked prefill (each chunk attends to the packed history and to itself
    exactly; with ``prefill=0`` the first call is the first chunk)."""
    if not isinstance(chunk, int) or chunk < 1:
        raise KVQuantConfigError(f"chunk={chunk!r} must be an int >= 1 (tokens per call after the prefill).")
    ids = window.reshape(1, -1).to(_model_device(model))
    n = ids.shape[1]
    first = max(1, min(prefill if prefill > 0 or chunk == 1 else chunk, n))
    kw = cache_kwarg_name(model)
    logits = [model(input_ids=ids[:, :first], use_cache=True, **{kw: cache}).logits[0]]
    for t in range(first, n - 1, chunk):
        e = min(t + chunk, n - 1)
        pos = torch.arange(t, e, device=ids.device)[None]
        logits.append(model(input_ids=ids[:, t:e], position_ids=pos, use_cache=True, **{kw: cache}).logits[0])
    lg = torch.cat(logits, 0)[: n - 1]
    return _nll_sum(lg, ids[0, 1:]), n - 1


# --------------------------------------------------------------------------------------------
# methods -> cache factories
# --------------------------------------------------------------------------------------------
def parse_any_method(method: Any, **overrides: Any) -> MethodSpec | QuantizedCacheSpec:
    """A simulated-cache :class:`MethodSpec` (:func:`parse_method` with ``overrides``) or a transformers
    ``QuantizedCache`` baseline (``quanto4`` ...); an unknown name's error lists both kinds of names."""
    if is_quantized_cache_method(method):
        return parse_quantized_cache_method(method)
    if overrides.get("recent_window") is not None and "recent_window" not in MethodSpec.__dataclass_fields__:
        raise KVQuantConfigError("recent_window: this kvquant_hf's MethodSpec has no recent_window; leave it unset.")
    try:
        return parse_method(method, **overrides)
    except KVQuantConfigError as exc:
        raise KVQuantConfigError(f"{exc} transformers' QuantizedCache baselines: {QUANTIZED_CACHE_NAMES}.") from exc


def _resolve_signposts(signposts: Any, bits: int, name: str | None = None) -> Any:
    """A loaded Signposts for ``bits`` from a folder, a ``{method name or bits: folder_or_Signposts}`` dict
    (the method's name wins over its bits) or a loaded object."""
    if isinstance(signposts, dict):
        if name is not None and name in signposts:
            signposts = signposts[name]
        elif bits in signposts:
            signposts = signposts[bits]
        else:
            raise KVQuantConfigError(
                f"no signposts for {name or f'nuq{bits}'}: the dict has keys {list(signposts)}; key it by method "
                "name or by bits."
            )
    if isinstance(signposts, (str, os.PathLike)):
        from ..signposts import load_signposts

        return load_signposts(str(signposts), bits=bits)
    return signposts


def _calibration_seconds(sp: Any) -> float | None:
    meta = getattr(sp, "metadata", None) or {}
    cal = meta.get("calibration", {}) if isinstance(meta, dict) else {}
    value = cal.get("duration_s") if isinstance(cal, dict) else None
    return float(value) if value is not None else None


class MethodRunner:
    """Builds a fresh cache per window for one method (parameters loaded once)."""

    def __init__(
        self,
        model: Any,
        spec: MethodSpec,
        cache_kind: str,
        signposts: Any,
        nuq_params: Sequence[NuqLayerParams] | None,
        outlier_fraction: float,
        prefill: int,
        chunk: int = 1,
    ):
        self.model = model
        self.chunk = chunk
        self.spec = spec
        self.cache_kind = cache_kind
        self.prefill = prefill
        self.outlier_fraction = outlier_fraction
        self.nuq_params = nuq_params
        self.signposts = None
        self.info: dict[str, Any] = {}
        if spec.family == "nuq" and nuq_params is None and signposts is not None:
            self.signposts = _resolve_signposts(signposts, int(spec.bits), spec.name)
            self.info["calibration_s"] = _calibration_seconds(self.signposts)
            meta = getattr(self.signposts, "metadata", {}) or {}
            self.info["fisher_weighting"] = meta.get("fisher_weighting")
            if cache_kind == "simulated":
                self.nuq_params = nuq_params_from_signposts(self.signposts, qnorm=spec.qnorm)
        if spec.family == "nuq" and self.nuq_params is None and self.signposts is None:
            self.info["uncalibrated"] = True
        if cache_kind == "real" and spec.family != "nuq":
            raise KVQuantConfigError(
                f"--cache real supports the nuq methods only (KVQuantCache stores nuqX); {spec.name} is a "
                "simulated baseline: use --cache simulated for it."
            )
        if cache_kind == "real" and not spec.storable:
            raise KVQuantConfigError(f"{spec.name}: this variant cannot be stored by KVQuantCache; use --cache simulated.")
        if cache_kind == "real" and nuq_params is not None:
            raise KVQuantConfigError("explicit nuq_params only work with the simulated cache; pass signposts instead.")
        self.n_clipped = 0
        self.n_keys = 0

    def new_cache(self) -> Any:
        if self.cache_kind == "simulated":
            return build_simulated_cache(self.model, self.spec, nuq_params=self.nuq_params,
                                         outlier_fraction=self.outlier_fraction)
        try:
            from ..cache import KVQuantCache
            from ..config import KVQuantConfig
        except ImportError as exc:  # pragma: no cover - depends on the cache module
            raise KVQuantError(
                "--cache real needs kvquant_hf.cache.KVQuantCache, which this checkout does not have yet; "
                "use --cache simulated."
            ) from exc
        cfg = KVQuantConfig(
            bits=int(self.spec.bits),
            outlier_fraction=self.outlier_fraction,
            outlier_slots=self.spec.outlier_slots,
            sink_tokens=self.spec.sink_tokens,
            recent_window=self.spec.recent_window,
            qnorm=self.spec.qnorm,
            backend="auto",
        )
        return KVQuantCache(cfg, self.signposts, model_config=self.model.config)

    def score(self, window: torch.Tensor) -> tuple[float, int]:
        cache = self.new_cache()
        if self.cache_kind == "simulated" and self.chunk > 1:
            # chunked prefill semantics: each call's tokens see each other exactly (as the real cache does)
            if hasattr(cache, "set_within_call"):
                cache.set_within_call("exact")
            nll, n = score_window_incremental(self.model, window, cache, self.prefill, self.chunk)
        elif self.cache_kind == "simulated":
            nll, n = score_window_simulated(self.model, window, cache, self.prefill)
        else:
            nll, n = score_window_incremental(self.model, window, cache, self.prefill, self.chunk)
        self.n_clipped += int(getattr(cache, "n_clipped", 0) or 0)
        self.n_keys += int(getattr(cache, "n_keys", 0) or 0)
        return nll, n


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def evaluate_perplexity(
    model: Any,
    tokenizer_or_ids: Any,
    methods: Sequence[str | MethodSpec] = DEFAULT_METHODS,
    *,
    text: str | None = None,
    text_file: str | None = None,
    seqlen: int = 2048,
    windows: int | None = None,
    signposts: Any = None,
    nuq_params: dict[str, Sequence[NuqLayerParams]] | None = None,
    outlier_fraction: float = 0.01,
    outlier_slots: int | None = None,
    sink_tokens: int = 1,
    qnorm: bool = False,
    cache: str = "simulated",
    prefill: int = 0,
    chunk: int = 1,
    recent_window: int | None = None,
    window_batch: int = DEFAULT_WINDOW_BATCH,
    progress: bool | Callable[[str], None] = False,
    state: dict[str, Any] | None = None,
    on_window: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Perplexity of ``model`` with each KV-cache method on non-overlapping windows of a text.

    Args:
        model: a Llama/Mistral causal LM (patched in place by :func:`kvquant_hf.models.patch_model`).
        tokenizer_or_ids: a tokenizer (with ``text`` or ``text_file``) or the token ids (tensor/list).
        methods: names ("fp16", "nuq4", "int3", "kivi2", "quanto4", ...) or :class:`MethodSpec` s (for variants;
            give them distinct ``name`` s). "fp16" is the unquantized model dtype. "quanto2"/"quanto4" (and
            "hqqX" with the hqq package) decode every window token by token through transformers' own
            ``QuantizedCache`` (:mod:`kvquant_hf.evaluation.quantized_cache_baseline`), whatever ``cache`` is.
        text / text_file: the evaluation text (WikiText-2 test for the paper protocol).
        seqlen: window length; windows: use the first N windows only (None: all).
        signposts: for nuq methods: a folder holding ``nuqX`` subfolders (or a ``nuqX`` folder), a
            ``{method name or bits: folder_or_Signposts}`` dict or a loaded Signposts. None: uncalibrated nuq
            (NormalFloat tables, key thresholds from the window itself; not a deployable setting).
        nuq_params: ``{method name: [NuqLayerParams per layer]}`` to override signposts (ablations).
        outlier_fraction / outlier_slots / sink_tokens / qnorm: nuq settings applied to method *names*
            (a MethodSpec carries its own). Slots default to ``ceil(outlier_fraction * head_dim)``.
        cache: "simulated" (one forward per window) or "real" (``KVQuantCache``, token-by-token decode).
        prefill: tokens of each window given in the first call (they attend to each other exactly, like a
            prompt); the rest are scored as decode steps. 0: every token is a decode step.
        chunk: tokens per call after the prefill (1: decode steps; > 1: chunked prefill: each call's tokens
            attend to each other exactly, also in the simulated caches, which then run one call per chunk).
        recent_window: passed to :func:`parse_method` for the simulated methods when given (None: the package
            default).
        window_batch: windows scored as the rows of one batch by the QuantizedCache baselines.
        progress: True to print a line per window (or a callable taking the line).
        state: a previous result of this function (or its ``"_state"``) to resume from: windows already
            scored for a method are skipped (same ``seqlen``/windows required).
        on_window: called with the running results after every window (e.g. to checkpoint a JSON).

    Returns:
        ``{method name: {"ppl", "nll" (mean token NLL), "nll_sum", "tokens", "windows", "avg_bits" (at
        ``seqlen``), "avg_bits_2k", "avg_bits_32k" (at 2048 and 32768 tokens), "seconds", "seconds_per_window",
        "window_nll" (per-window NLL sums), "spec", ...}}``.
    """
    if cache not in CACHE_KINDS:
        raise KVQuantConfigError(f"cache={cache!r} is not supported; choose one of {CACHE_KINDS}.")
    log = progress if callable(progress) else (print if progress else None)
    patch_model(model)
    ids = load_token_ids(tokenizer_or_ids, text=text, text_file=text_file)
    wins = make_windows(ids, seqlen, windows)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    slots = outlier_slots if outlier_slots is not None else default_outlier_slots(outlier_fraction, head_dim)
    extra = {} if recent_window is None else {"recent_window": recent_window}
    specs = [parse_any_method(m, outlier_slots=slots, sink_tokens=sink_tokens, qnorm=qnorm, **extra) for m in methods]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise KVQuantConfigError(f"method names must be distinct, got {names}; give MethodSpecs distinct names.")
    nuq_params = nuq_params or {}
    runners = {
        s.name: QuantizedCacheRunner(model, s, prefill, chunk, window_batch) if isinstance(s, QuantizedCacheSpec)
        else MethodRunner(model, s, cache, signposts, nuq_params.get(s.name), outlier_fraction, prefill, chunk)
        for s in specs
    }

    results: dict[str, dict[str, Any]] = {}
    prev = (state or {}).get("_state", state) or {}
    for s in specs:
        old = prev.get(s.name) if isinstance(prev, dict) else None
        done = list(old.get("window_nll", [])) if isinstance(old, dict) and old.get("seqlen") == seqlen else []
        results[s.name] = {
            "method": s.name,
            "spec": asdict(s),
            "cache": "QuantizedCache" if isinstance(s, QuantizedCacheSpec) else cache,
            "seqlen": seqlen,
            "window_nll": done[: wins.shape[0]],
            "seconds": float(old.get("seconds", 0.0)) if done else 0.0,
            "avg_bits": any_avg_bits(model.config, s, seqlen),
            "avg_bits_2k": any_avg_bits(model.config, s, 2048),
            "avg_bits_32k": any_avg_bits(model.config, s, 32768),
            "head_dim": head_dim,
            **runners[s.name].info,
        }
    for w in range(wins.shape[0]):
        for s in specs:
            r = results[s.name]
            if len(r["window_nll"]) > w:
                continue
            t0 = time.perf_counter()
            if isinstance(runners[s.name], QuantizedCacheRunner):  # this window and the next ones, as one batch
                scored = runners[s.name].score_many(wins[w: w + runners[s.name].window_batch])
            else:
                scored = [runners[s.name].score(wins[w])]
            r["seconds"] += time.perf_counter() - t0
            for i, (nll, n) in enumerate(scored):
                r["window_nll"].append(nll)
                r["tokens_per_window"] = n
                if log:
                    log(f"[ppl] window {w + 1 + i}/{wins.shape[0]} {s.name}: window ppl {math.exp(nll / n):.3f} "
                        f"running ppl {math.exp(sum(r['window_nll']) / (n * len(r['window_nll']))):.3f}")
        if on_window:
            on_window(_finalize(results, runners))
    return _finalize(results, runners)


def _finalize(results: dict[str, dict[str, Any]], runners: dict[str, MethodRunner]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, r in results.items():
        r = dict(r)
        n_win = len(r["window_nll"])
        per = r.get("tokens_per_window", r["seqlen"] - 1)
        tokens = per * n_win
        total = float(sum(r["window_nll"]))
        r.update(
            nll_sum=total,
            tokens=tokens,
            windows=n_win,
            nll=total / tokens if tokens else float("nan"),
            ppl=math.exp(total / tokens) if tokens else float("nan"),
            seconds_per_window=r["seconds"] / n_win if n_win else float("nan"),
        )
        runner = runners.get(name)
        if getattr(runner, "storage", None) is not None:
            r["storage_measured"] = runner.storage  # the last batch's cache, as stored after its last call
        if runner is not None and runner.n_keys:
            # key outliers beyond the slots, clipped to the threshold, per stored key element
            r["key_clipped_fraction"] = runner.n_clipped / (runner.n_keys * r["head_dim"])
        out[name] = r
    return out


def summary_table(results: dict[str, dict[str, Any]], baseline: str = "fp16") -> str:
    """Markdown table: method, PPL, delta vs ``baseline`` (%), average bits."""
    base = results.get(baseline, {}).get("ppl")
    lines = ["| method | PPL | delta vs fp16 | avg bits | windows |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        delta = "" if base is None or name == baseline else f"{100 * (r['ppl'] / base - 1):+.2f}%"
        lines.append(f"| {name} | {r['ppl']:.3f} | {delta} | {r['avg_bits']:.3f} | {r['windows']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvquant_hf.evaluation.perplexity",
        description="Perplexity with simulated or real KVQuant / intX / KIVI KV caches (non-overlapping windows).",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model name/folder, a .gguf file, or 'smollm2' (embedded)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    p.add_argument("--text-file", required=True, help="evaluation text (e.g. WikiText-2 test.raw.txt)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    p.add_argument("--windows", type=int, default=None, help="first N windows only (default: all)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help=f"any of: {METHOD_NAMES}; {QUANTIZED_CACHE_NAMES}")
    p.add_argument("--signposts", default=None,
                   help="folder with nuqX subfolders written by calibrate.py (needed by the nuqX methods)")
    p.add_argument("--uncalibrated", action="store_true",
                   help="run nuqX methods without --signposts: NormalFloat tables and key ranges from each window "
                        "(for smoke tests; the numbers are not KVQuant's)")
    p.add_argument("--outlier-fraction", type=float, default=0.01, help="fraction of entries kept exact (nuq)")
    p.add_argument("--outlier-slots", type=int, default=None, help="default ceil(fraction * head_dim)")
    p.add_argument("--sink-tokens", type=int, default=1, help="first tokens of each window kept exact (nuq)")
    p.add_argument("--qnorm", action="store_true", help="Q-Norm corrected lookup tables (nuq; needs signposts)")
    p.add_argument("--cache", choices=CACHE_KINDS, default="simulated",
                   help="simulated: quantize-dequantize in float; real: the packed KVQuantCache (nuq only)")
    p.add_argument("--prefill", type=int, default=0,
                   help="tokens of each window given in one first call (exact among themselves), then decode")
    p.add_argument("--chunk", type=int, default=1,
                   help="tokens per call after the prefill (1: token-by-token decode / one simulated forward; e.g. "
                        "1024: chunked prefill, each chunk exact among itself over the quantized history)")
    p.add_argument("--recent-window", type=int, default=None,
                   help="recent tokens the simulated methods keep exact (default: the package's)")
    p.add_argument("--window-batch", type=int, default=DEFAULT_WINDOW_BATCH,
                   help="windows per batch of the QuantizedCache methods (token-by-token decode)")
    p.add_argument("--json", default=None, help="write results here (checkpointed after every window; resumes)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default: float32 on CPU, float16 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; unknown methods, and nuqX methods without ``--signposts`` (unless
    ``--uncalibrated``), exit with status 2 and a message saying what to pass."""
    parser = build_parser()
    args = parser.parse_args(argv)
    nuq = []
    for method in args.methods:
        try:
            spec = parse_any_method(method)
        except KVQuantError as exc:
            parser.error(f"--methods: {exc}")
        if spec.family == "nuq":
            nuq.append(spec.name)
    if nuq and not args.signposts and not args.uncalibrated:
        parser.error(
            f"{', '.join(nuq)} need calibrated signposts: pass --signposts S (a folder written by calibrate.py), "
            "or --uncalibrated to run them with NormalFloat tables and key ranges from each window."
        )
    return args


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process (glibc ``mallopt``) so that CPU forwards stop paying page faults.

    glibc returns every block above its mmap threshold to the OS on free; a 2048-token forward allocates
    thousands of such MB-sized temporaries, and on virtual machines re-faulting them costs more than the
    arithmetic. Raising the mmap and trim thresholds (32 MiB / 1 GiB) keeps them in the heap. Returns whether
    it applied (glibc only). Process-wide: called by the command-line entry points, never by the library.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def run_info(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Command, date, machine and versions for result files."""
    import transformers

    info = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "kvquant_hf.evaluation.perplexity", *sys.argv[1:]])
        if args is not None else " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''} "
                   f"{os.cpu_count()} cpus".strip(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from ..models.loading import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        tune_cpu_allocator()
    dtype = args.dtype or ("float32" if device == "cpu" else "float16")
    model, tok = load_model_and_tokenizer(args.model, args.gguf_file, dtype=getattr(torch, dtype), device=device)
    state = None
    if args.json and os.path.isfile(args.json):
        with open(args.json) as f:
            state = json.load(f).get("results")
    meta = {**run_info(args), "model": args.model, "dtype": dtype, "device": device, "text_file": args.text_file,
            "seqlen": args.seqlen, "signposts": args.signposts, "uncalibrated": args.uncalibrated,
            "outlier_fraction": args.outlier_fraction, "sink_tokens": args.sink_tokens, "qnorm": args.qnorm, "cache": args.cache, "prefill": args.prefill,
            "chunk": args.chunk, "recent_window": args.recent_window, "window_batch": args.window_batch}

    def checkpoint(res: dict[str, Any]) -> None:
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"meta": meta, "results": res}, f, indent=1)
            os.replace(tmp, args.json)

    res = evaluate_perplexity(
        model, tok, args.methods, text_file=args.text_file, seqlen=args.seqlen, windows=args.windows,
        signposts=args.signposts, outlier_fraction=args.outlier_fraction, outlier_slots=args.outlier_slots,
        sink_tokens=args.sink_tokens, qnorm=args.qnorm, cache=args.cache, prefill=args.prefill,
        chunk=args.chunk, recent_window=args.recent_window, window_batch=args.window_batch,
        progress=not args.quiet, state=state, on_window=checkpoint,
    )
    checkpoint(res)
    print(summary_table(res))
    return res


if __name__ == "__main__":
    main()
