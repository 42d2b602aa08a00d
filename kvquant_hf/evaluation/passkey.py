"""Passkey retrieval: find a 5-digit number hidden in a long synthetic haystack (the standard long-context probe).

Prompt (the usual format): an instruction, the filler "The grass is green. The sky is blue. The sun is yellow.
Here we go. There and back again." repeated to the requested length, with "The pass key is NNNNN. Remember it.
NNNNN is the pass key." inserted at a relative depth (0 = start, 1 = end of the haystack), then "What is the pass
key? The pass key is". The model decodes a few tokens greedily; a trial is correct when the first 5-digit number
in the answer is the pass key. ``length`` counts the whole context: prompt plus the generated tokens.

Methods:

* ``fp16``: the model's own cache (``DynamicCache``) in the model dtype (float32 on CPU by default);
* ``nuq2``/``nuq3``/``nuq4``: the real :class:`~kvquant_hf.cache.KVQuantCache` through ``generate(...,
  cache_implementation="kvquant")`` with chunked prefill (``--chunk``, default 1024 tokens, so every length
  here is prefilled in several chunks) and ``--signposts`` (uncalibrated without);
* ``kivi2``/``kivi4``: the simulated KIVI-style cache of :mod:`kvquant_hf.simulated` passed to ``generate``
  (fake quantization, post-RoPE keys per channel over groups of 32 tokens of the prompt; decoded tokens are
  quantized one call at a time, i.e. in groups of one, which leaves their keys nearly exact, much like KIVI's
  full-precision recent window). ``int2``/``int4`` (per-token, simulated) work the same way.

Trials use the same pass keys and prompts for every method (seeded per length, depth and trial).

Command line::

    python -m kvquant_hf.evaluation.passkey --model smollm2 --lengths 2048 4096 --depths 0 0.25 0.5 0.75 1 \\
        --trials 10 --methods fp16 nuq4 kivi2 [--signposts DIR] [--json OUT] [--device cuda]

JSON written by ``--json``: ``{"config": {...}, "methods": {METHOD: {"accuracy": float, "correct": int,
"total": int, "cells": [{"length", "depth", "trials", "correct", "accuracy", "prompt_tokens", "outputs":
[{"passkey", "answer", "correct"}]}]}}, "environment": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import KVQuantConfigError

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
DEFAULT_METHODS = ("fp16", "nuq4", "kivi2")
_METHOD_RE = re.compile(r"^(fp16|nuq[234]|kivi[234]|int[234])$")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and getattr(tokenizer, "add_bos_token", True) else []


def build_prompt(tokenizer, length: int, depth: float, passkey: str, new_tokens: int = 8) -> list[int]:
    """Token ids of a passkey prompt whose length plus ``new_tokens`` is at most ``length`` (as close as the
    filler's granularity allows), with the needle after ``round(depth * n)`` of the ``n`` filler repetitions."""
    if not 0.0 <= depth <= 1.0:
        raise KVQuantConfigError(f"depth={depth} must be in [0, 1].")
    budget = length - new_tokens
    fixed = len(_bos(tokenizer)) + len(_encode(tokenizer, INSTRUCTION + NEEDLE.format(key=passkey) + QUESTION))
    per = max(1, len(_encode(tokenizer, FILLER * 8)) / 8)
    n = max(0, int((budget - fixed) / per))
    while True:
        at = round(depth * n)
        text = INSTRUCTION + FILLER * at + NEEDLE.format(key=passkey) + FILLER * (n - at) + QUESTION
        ids = _bos(tokenizer) + _encode(tokenizer, text)
        if len(ids) <= budget or n == 0:
            break
        n -= max(1, int((len(ids) - budget) / per))
    if len(ids) > budget:
        raise KVQuantConfigError(
            f"length={length} is too short for the instruction, needle and question ({len(ids)} tokens + "
            f"{new_tokens} new); use a longer length."
        )
    return ids


def extract_passkey(answer: str) -> str | None:
    """The first run of exactly 5 digits in the answer (None if there is none)."""
    m = re.search(r"(?<!\d)(\d{5})(?!\d)", answer)
    return m.group(1) if m else None


_SIGNPOSTS: dict = {}


def loaded_signposts(folder: str, bits: int):
    """Signposts of ``folder`` for ``bits``, loaded (and checksum-verified) once per process, not per prompt."""
    key = (os.path.abspath(folder), bits)
    if key not in _SIGNPOSTS:
        from ..signposts import load_signposts

        _SIGNPOSTS[key] = load_signposts(folder, bits=bits)
    return _SIGNPOSTS[key]


def generate(model, ids: torch.Tensor, method: str, new_tokens: int, signposts: str | None, chunk: int,
              pad_id: int, cache_config: dict | None = None) -> list[int]:
    kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad_id,
                              "attention_mask": torch.ones_like(ids)}
    if method.startswith("nuq"):
        cfg = {"bits": int(method[3:]), "prefill_chunk_size": chunk, **(cache_config or {})}
        if signposts:
            cfg["signposts"] = loaded_signposts(signposts, int(method[3:]))
        out = model.generate(ids, cache_implementation="kvquant", cache_config=cfg, **kwargs)
    elif method == "fp16":
        out = model.generate(ids, **kwargs)
    else:  # simulated kivi / int cache: patched attention, the cache object handed to generate
        from ..generation import cache_kwarg_name
        from ..models import patch_model
        from ..simulated import build_simulated_cache

        patch_model(model)
        cache = build_simulated_cache(model, method)
        out = model.generate(ids, **{cache_kwarg_name(model): cache}, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def run_passkey(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
                methods: Sequence[str], signposts: str | None = None, chunk: int = 1024, new_tokens: int = 8,
                seed: int = 0, log=None, on_cell=None, cache_config: dict | None = None) -> dict[str, Any]:
    """Run the passkey grid; returns ``{method: {"accuracy", "correct", "total", "cells": [...]}}``.

    ``on_cell(results)`` is called after every (length, depth) cell with the results so far (checkpoints).
    """
    for m in methods:
        if not _METHOD_RE.match(m):
            raise KVQuantConfigError(f"method {m!r} is not supported; use fp16, nuq2/3/4, kivi2/3/4 or int2/3/4.")
    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    results: dict[str, Any] = {m: {"accuracy": 0.0, "correct": 0, "total": 0, "cells": []} for m in methods}
    for length in lengths:
        for depth in depths:
            cells = {m: {"length": int(length), "depth": float(depth), "trials": 0, "correct": 0, "outputs": []}
                     for m in methods}
            for t in range(trials):
                rng = random.Random(f"{seed}-{length}-{depth}-{t}")
                key = str(rng.randint(10000, 99999))
                ids = torch.tensor([build_prompt(tokenizer, int(length), float(depth), key, new_tokens)],
                                   device=device)
                for m in methods:
                    with torch.inference_mode():
                        new = generate(model, ids, m, new_tokens, signposts, chunk, pad_id, cache_config)
                    answer = tokenizer.decode(new, skip_special_tokens=True)
                    ok = extract_passkey(answer) == key
                    cell = cells[m]
                    cell["trials"] += 1
                    cell["correct"] += int(ok)
                    cell["prompt_tokens"] = int(ids.shape[1])
                    cell["outputs"].append({"passkey": key, "answer": answer, "correct": ok})
            for m in methods:
                cell = cells[m]
                cell["accuracy"] = cell["correct"] / max(1, cell["trials"])
                results[m]["cells"].append(cell)
                results[m]["correct"] += cell["correct"]
                results[m]["total"] += cell["trials"]
                results[m]["accuracy"] = results[m]["correct"] / max(1, results[m]["total"])
                if log:
                    log(f"{m:6s} length {length:>6} depth {depth:.2f}: {cell['correct']}/{cell['trials']}")
            if on_cell:
                on_cell(results)
    for m in methods:
        results[m]["accuracy"] = results[m]["correct"] / max(1, results[m]["total"])
    return results


def summary_table(results: dict[str, Any]) -> str:
    """Markdown: one row per method, one column per length (accuracy over depths and trials), and overall."""
    methods = list(results)
    lengths = sorted({c["length"] for m in methods for c in results[m]["cells"]})
    lines = ["| method | " + " | ".join(str(n) for n in lengths) + " | overall |",
             "|---" * (len(lengths) + 2) + "|"]
    for m in methods:
        cells = []
        for n in lengths:
            sel = [c for c in results[m]["cells"] if c["length"] == n]
            cells.append(f"{sum(c['correct'] for c in sel) / max(1, sum(c['trials'] for c in sel)):.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {results[m]['accuracy']:.3f} |")
    return "\n".join(lines)


def load_model_and_tokenizer(*args, **kwargs):
    from ..models.loading import load_model_and_tokenizer as load

    return load(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvquant_hf.evaluation.passkey", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model name/folder, a .gguf file, or 'smollm2' (embedded)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--signposts", default=None, help="folder with nuqX subfolders written by calibrate.py")
    p.add_argument("--chunk", type=int, default=1024, help="prefill_chunk_size of the nuq caches")
    p.add_argument("--cache-config", default=None, metavar="JSON",
                   help='more cache_config for the nuq caches, e.g. \'{"qnorm": true}\'')
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    extra_cfg = None
    if args.cache_config:
        try:
            extra_cfg = json.loads(args.cache_config)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--cache-config is not valid JSON ({exc}); e.g. --cache-config '{{\"qnorm\": true}}'")
        if not isinstance(extra_cfg, dict):
            raise SystemExit(f"--cache-config must be a JSON object, got {type(extra_cfg).__name__}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model, tok = load_model_and_tokenizer(args.model, dtype=getattr(torch, dtype), device=device)
    start = time.time()

    def document(results: dict[str, Any], complete: bool) -> dict[str, Any]:
        return {
            "config": {k: v for k, v in vars(args).items() if k != "json"} | {"device": device, "dtype": dtype},
            "complete": complete,
            "methods": results,
            "environment": {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - start, 1),
                "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
                "torch": torch.__version__, "command": " ".join(["python -m kvquant_hf.evaluation.passkey"] + list(
                    sys.argv[1:] if argv is None else argv)),
            },
        }

    def write(results: dict[str, Any], complete: bool) -> None:
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            tmp = args.json + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(document(results, complete), fh, indent=1)
            os.replace(tmp, args.json)

    results = run_passkey(model, tok, args.lengths, args.depths, args.trials, args.methods, args.signposts,
                          args.chunk, args.new_tokens, args.seed, log=lambda s: print(s, flush=True),
                          on_cell=lambda res: write(res, False), cache_config=extra_cfg)
    print(summary_table(results))
    write(results, True)
    return document(results, True)


if __name__ == "__main__":
    main()
