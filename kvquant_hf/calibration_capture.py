"""Calibration data and capture: text -> token windows -> a bounded sample of pre-RoPE keys, values and their
Fisher information per layer (steps 1-4 of the recipe in :mod:`kvquant_hf.calibration`).

For each window one forward and backward pass runs; forward hooks on every layer's ``self_attn.k_proj`` and
``self_attn.v_proj`` capture the activations, and the squared gradient of the LM loss with respect to them is
their Fisher information. A reservoir keeps at most ``max_tokens_per_layer`` token rows (the same positions in
every layer) on CPU in float32, so memory does not grow with the number of windows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import KVQuantConfigError, UnsupportedModelError
from .models.loading import model_identity
from .signposts import FISHER_WEIGHTINGS

DEFAULT_MAX_TOKENS_PER_LAYER = 16384
_PROJ_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(k_proj|v_proj)$")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
CALIBRATION_DATASETS = ("wikitext2",)
OFFLINE_TEXT_HINT = "--text-file ../shared/data/wikitext-2/valid.tokens.txt"


def load_calibration_text(
    text_file: str | None = None, dataset: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Read the calibration text from a file or a named dataset; returns `(text, source_info)`.

    Args:
        text_file (`str`, *optional*): a UTF-8 text file, read in place (newlines kept as they are, so the
            recorded `text_sha256` equals the file's SHA-256).
        dataset (`str`, *optional*): "wikitext2" (the wikitext-2-raw-v1 train split through `datasets`,
            rows joined with blank lines; needs the network or a local `datasets` cache).
    """
    if (text_file is None) == (dataset is None):
        raise KVQuantConfigError("give exactly one of text_file (--text-file) or dataset (--dataset).")
    if text_file is not None:
        return read_text_file(text_file), {"text_file": text_file}
    if dataset not in CALIBRATION_DATASETS:
        raise KVQuantConfigError(
            f"dataset={dataset!r} is not supported; choose one of {CALIBRATION_DATASETS} or use --text-file."
        )
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"]
    except Exception as exc:  # datasets raises many types when offline (ConnectionError, FileNotFoundError...)
        raise KVQuantConfigError(
            f"could not load {dataset} with the `datasets` library ({type(exc).__name__}: {exc}); without network "
            f"access pass a local text instead, e.g. {OFFLINE_TEXT_HINT}"
        ) from exc
    return "\n\n".join(rows), {"dataset": "wikitext-2-raw-v1/train"}


_BINARY_MAGIC = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
                 b"(\xb5/\xfd": "zstd", b"\x89PNG": "PNG", b"%PDF": "PDF"}


def read_text_file(text_file: Any) -> str:
    """The UTF-8 text of a calibration file, newlines kept as they are; a clear error for anything else.

    Refused: a path that is not a string, a missing or unreadable file, a folder, a compressed or other binary
    file (NUL bytes or a known magic number), text that is not UTF-8, and a file with no text at all.
    """
    if not isinstance(text_file, (str, os.PathLike)) or not os.fspath(text_file):
        raise KVQuantConfigError(f"text_file={text_file!r} is not a file path; pass --text-file PATH.")
    if os.path.isdir(text_file):
        raise KVQuantConfigError(
            f"the calibration text {os.fspath(text_file)!r} is a folder, not a file; pass a UTF-8 text file, e.g. "
            f"{OFFLINE_TEXT_HINT}"
        )
    try:
        with open(text_file, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise KVQuantConfigError(f"cannot read the calibration text {os.fspath(text_file)!r}: {exc}.") from exc
    name = os.fspath(text_file)
    kind = next((k for magic, k in _BINARY_MAGIC.items() if data.startswith(magic)), None)
    if kind is None and b"\x00" in data[:1 << 20]:
        kind = "binary (it contains NUL bytes)"
    if kind:
        raise KVQuantConfigError(
            f"the calibration text {name!r} is a {kind} file, not UTF-8 text; decompress or convert it first "
            f"(e.g. gunzip), or pass a plain text file such as {OFFLINE_TEXT_HINT}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KVQuantConfigError(
            f"the calibration text {name!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start} "
            "cannot be decoded); convert it to UTF-8 (e.g. iconv -t UTF-8) or pass another --text-file."
        ) from exc
    if not text.strip():
        raise KVQuantConfigError(f"the calibration text {name!r} is empty; pass a file with text to calibrate on.")
    return text


def tokenize_calibration_text(tokenizer: Any, text: str | Sequence[str]) -> torch.Tensor:
    """Token ids ``int64 [n]`` of a calibration text (a list of texts is joined with blank lines).

    No special tokens are added: windows are cut from the middle of the stream.
    """
    if not isinstance(text, str):
        text = "\n\n".join(text)
    if tokenizer is None:
        raise KVQuantConfigError("calibrate() got text but no tokenizer; pass the model's tokenizer or token ids.")
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(enc["input_ids"], dtype=torch.long)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """``nsamples`` random windows ``[nsamples, seqlen]`` of a token stream ``ids [n]`` and their starts.

    Windows may overlap (uniform random starts, like the reference recipe); the draw is seeded.
    """
    n = int(ids.numel())
    if nsamples < 1 or seqlen < 2:
        raise KVQuantConfigError(f"nsamples={nsamples} and seqlen={seqlen} must be >= 1 and >= 2.")
    if n < seqlen:
        raise KVQuantConfigError(
            f"the calibration text has only {n} tokens, fewer than seqlen={seqlen}; use a longer text or a smaller "
            "seqlen (--seqlen)."
        )
    rng = np.random.default_rng(seed)
    starts = [int(s) for s in rng.integers(0, n - seqlen + 1, size=nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts]), starts


# --------------------------------------------------------------------------------------------
# model plumbing
# --------------------------------------------------------------------------------------------
def find_kv_projections(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``[(k_proj, v_proj)]`` per decoder layer, in layer order (``*.layers.{i}.self_attn.{k,v}_proj``)."""
    found: dict[int, dict[str, nn.Module]] = {}
    for name, module in model.named_modules():
        m = _PROJ_RE.search(name)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = module
    n_layers = model.config.num_hidden_layers
    if sorted(found) != list(range(n_layers)) or any(len(v) != 2 for v in found.values()):
        raise UnsupportedModelError(
            f"calibration needs separate self_attn.k_proj and self_attn.v_proj modules in each of the {n_layers} "
            f"decoder layers (Llama/Mistral style); found them in layers {sorted(found)} of "
            f"{type(model).__name__}. Fused qkv projections are not supported."
        )
    return [(found[i]["k_proj"], found[i]["v_proj"]) for i in range(n_layers)]


# --------------------------------------------------------------------------------------------
# capture: activations + Fisher in a bounded reservoir
# --------------------------------------------------------------------------------------------
@dataclass
class CalibrationSample:
    """Reservoir sample of per-layer token rows (CPU float32).

    Args:
        keys / values (`list[torch.Tensor]`): per layer `[n, num_kv_heads * head_dim]` pre-RoPE keys / values.
        key_fisher / value_fisher (`list[torch.Tensor]`): squared gradients, same shapes (ones when the
            Fisher weighting is "none").
        model_dtype (`torch.dtype`): dtype of the captured activations (sets the value scale rounding).
        tokens_seen (`int`): tokens offered to the reservoir (sinks excluded).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_fisher: list[torch.Tensor]
    value_fisher: list[torch.Tensor]
    num_kv_heads: int
    head_dim: int
    model_dtype: torch.dtype
    tokens_seen: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.keys[0].shape[0])


class Reservoir:
    """Algorithm-R reservoir over token positions, shared by all layers (same rows everywhere)."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.seen = 0
        self.filled = 0
        self.rng = np.random.default_rng(seed)

    def assign(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots for the next ``n`` tokens: ``(src, dst)`` index tensors (token in window -> reservoir slot)."""
        t = self.seen + np.arange(n)
        dst = np.where(t < self.capacity, t, -1)
        late = t >= self.capacity
        if late.any():
            j = np.floor(self.rng.random(int(late.sum())) * (t[late] + 1)).astype(np.int64)
            dst[late] = np.where(j < self.capacity, j, -1)
        self.seen += n
        self.filled = min(self.capacity, self.seen)
        keep = np.nonzero(dst >= 0)[0]
        # a later token overwrites an earlier one that drew the same slot (sequential semantics)
        _, last = np.unique(dst[keep][::-1], return_index=True)
        keep = keep[::-1][last]
        return torch.from_numpy(keep.copy()), torch.from_numpy(dst[keep].copy())


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings()
    return emb.weight.device


def capture_calibration_sample(
    model: nn.Module,
    windows: torch.Tensor,
    sink_tokens: int = 1,
    fisher_weighting: str = "fisher",
    max_tokens_per_layer: int = DEFAULT_MAX_TOKENS_PER_LAYER,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationSample:
    """Run one forward (+ backward) pass per window and keep a bounded sample of K/V rows and Fisher.

    Args:
        model: a causal LM with `*.layers.{i}.self_attn.{k,v}_proj` modules (any dtype / device map).
        windows (`torch.LongTensor` of shape `[nsamples, seqlen]`): token windows.
        sink_tokens (`int`): leading tokens of each window to leave out.
        fisher_weighting (`str`): "fisher", "fisher_x2" (both need gradients) or "none" (forward only).
        max_tokens_per_layer (`int`): reservoir size (token rows kept per layer).
        seed (`int`): seeds the reservoir.
        progress (`bool`): show a tqdm bar.

    Returns:
        `CalibrationSample`
    """
    if fisher_weighting not in FISHER_WEIGHTINGS:
        raise KVQuantConfigError(
            f"fisher_weighting={fisher_weighting!r} is not supported; choose one of {FISHER_WEIGHTINGS}."
        )
    if windows.dim() != 2:
        raise KVQuantConfigError(f"windows must be [nsamples, seqlen] token ids, got shape {tuple(windows.shape)}.")
    nsamples, seqlen = windows.shape
    if not 0 <= sink_tokens < seqlen - 1:
        raise KVQuantConfigError(f"sink_tokens={sink_tokens} must be in [0, seqlen - 1) (seqlen={seqlen}).")
    if max_tokens_per_layer < 1:
        raise KVQuantConfigError(f"max_tokens_per_layer={max_tokens_per_layer} must be positive.")
    projections = find_kv_projections(model)
    ident = model_identity(model)
    n_kv, head_dim = int(ident["num_key_value_heads"]), int(ident["head_dim"])
    kv_dim = n_kv * head_dim
    n_layers = len(projections)
    use_grad = fisher_weighting != "none"
    per_window = seqlen - sink_tokens
    capacity = min(max_tokens_per_layer, nsamples * per_window)
    buffers = [[torch.zeros(capacity, kv_dim, dtype=torch.float32) for _ in range(n_layers)] for _ in range(4)]
    keys, values, key_fisher, value_fisher = buffers
    if not use_grad:
        for t in key_fisher + value_fisher:
            t.fill_(1.0)
    reservoir = Reservoir(capacity, seed + 1)

    acts: dict[tuple[int, int], torch.Tensor] = {}

    def make_hook(layer: int, which: int):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if output.shape[-1] != kv_dim:
                raise UnsupportedModelError(
                    f"layer {layer} {'k_proj' if which == 0 else 'v_proj'} returned {output.shape[-1]} features, "
                    f"expected num_key_value_heads * head_dim = {kv_dim}."
                )
            acts[(layer, which)] = output

        return hook

    def require_grad_hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        # parameters are frozen: make the graph start at the embeddings so that K/V get gradients
        return output.requires_grad_(True) if use_grad and not output.requires_grad else output

    handles = [model.get_input_embeddings().register_forward_hook(require_grad_hook)]
    for i, (k_proj, v_proj) in enumerate(projections):
        handles.append(k_proj.register_forward_hook(make_hook(i, 0)))
        handles.append(v_proj.register_forward_hook(make_hook(i, 1)))
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in grad_flags:
        p.requires_grad_(False)
    model.eval()
    device = _input_device(model)
    model_dtype = None
    try:
        for w in tqdm(range(nsamples), desc="calibration windows", disable=not progress):
            acts.clear()
            ids = windows[w : w + 1].to(device)
            with torch.inference_mode(False), torch.set_grad_enabled(use_grad):
                out = model(input_ids=ids, use_cache=False)
                if len(acts) != 2 * n_layers:
                    raise UnsupportedModelError(
                        f"the forward pass called {len(acts)} of the {2 * n_layers} k_proj/v_proj modules; "
                        "calibration needs every layer to project keys and values."
                    )
                flat = [acts[(i, j)] for i in range(n_layers) for j in (0, 1)]
                model_dtype = flat[0].dtype
                if use_grad and not flat[0].requires_grad:
                    raise UnsupportedModelError(
                        "the captured keys do not require grad, so no Fisher information can be computed (does the "
                        "model bypass get_input_embeddings()?); use fisher_weighting='none' for this model."
                    )
                if use_grad:
                    logits = out.logits[0, :-1]
                    loss = nn.functional.cross_entropy(logits.float(), ids[0, 1:].to(logits.device))
                    # fp16 gradients of a mean over thousands of tokens underflow: scale, then undo in fp32
                    grad_scale = float(seqlen - 1) if model_dtype in (torch.float16, torch.bfloat16) else 1.0
                    grads = torch.autograd.grad(loss * grad_scale, flat, allow_unused=True)
                del out
            src, dst = reservoir.assign(per_window)
            if src.numel() == 0:
                continue
            rows_cpu = src + sink_tokens
            for idx, act in enumerate(flat):
                layer, which = divmod(idx, 2)
                rows_idx = rows_cpu.to(act.device)
                rows = act[0].detach().index_select(0, rows_idx)
                (keys if which == 0 else values)[layer][dst] = rows.float().cpu()
                if use_grad:
                    g = grads[idx]
                    if g is None:
                        fisher = torch.zeros(rows.shape, dtype=torch.float32)
                    else:
                        g = g[0].index_select(0, rows_idx).float() / grad_scale
                        fisher = (g * g).cpu()
                    (key_fisher if which == 0 else value_fisher)[layer][dst] = fisher
            del flat
            if use_grad:
                del grads
    finally:
        acts.clear()
        for h in handles:
            h.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    n = reservoir.filled
    return CalibrationSample(
        keys=[t[:n] for t in keys],
        values=[t[:n] for t in values],
        key_fisher=[t[:n] for t in key_fisher],
        value_fisher=[t[:n] for t in value_fisher],
        num_kv_heads=n_kv,
        head_dim=head_dim,
        model_dtype=model_dtype or torch.float32,
        tokens_seen=reservoir.seen,
    )
