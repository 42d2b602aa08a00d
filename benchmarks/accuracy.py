"""Perplexity of SmolLM2-135M-Instruct with KVQuant, intX and KIVI caches on two texts and two window lengths.

The paper protocol on the *whole* text: tokenize it once, non-overlapping windows of ``seqlen`` tokens,
``PPL = exp(mean token NLL)``. Every method goes through the same patched attention and the simulated caches of
:mod:`kvquant_hf.simulated` (decode-equivalent: each token attends to the quantized history and to itself
exactly; checked equal to the real cache in ``tests/test_perplexity.py``).

Texts (``--texts``): ``wikitext2``, the WikiText-2 test text (``--text-file``; the calibration text is WikiText-2
validation), and ``docstrings``, English prose of the Python standard library's docstrings
(:mod:`kvquant_hf.evaluation.docstring_text`, built into ``--cache-dir`` when missing; never used for
calibration): another domain than Wikipedia. Window lengths (``--seqlens``): 2048 (the paper's) and 8192
(SmolLM2's limit).

Method groups (each can run as its own process; each checkpoints after every window and resumes):

* ``baselines``: fp16 (unquantized), int4/int3/int2 (uniform, per token, post-RoPE keys), KIVI-4/KIVI-2
  (keys per channel in groups of 32 tokens after RoPE, values per token; no fp16 residual).
* ``nuq-1pct``: nuq4/nuq3/nuq2 with 1% outliers (one exact slot per token and head at head_dim 64), signposts of
  ``calibrate.py`` in ``<signposts-root>/smollm2-1pct``.
* ``nuq-0pct``: nuq4/nuq3/nuq2 without outliers (``smollm2-0pct``: key thresholds at min/max).
* ``nuq-uniform``: the 1% thresholds with uniform key and value tables (``smollm2-1pct-uu``: ``calibrate.py
  --key-table uniform --value-table uniform``, the tables the CUDA decode kernel needs no lookups for).

Usage (a whole text takes hours per group and window length on one CPU core, minutes on an H100)::

    python -m benchmarks.accuracy --groups baselines --work-dir W &     # one process per group
    python -m benchmarks.accuracy --groups nuq-1pct --work-dir W &
    python -m benchmarks.accuracy --render-only --work-dir W            # merge into results/accuracy.{md,json}
    python -m benchmarks.accuracy --smoke                               # tiny random model, byte ids, CPU

Checkpoints live in ``W/<text>-<seqlen>/<group>.json``. ``--windows 8`` gives the quick first-8-windows numbers
(of every text and window length).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import torch

from benchmarks.common import md_table, random_model, write_result
from kvquant_hf.evaluation import docstring_text, evaluate_perplexity
from kvquant_hf.simulated import MethodSpec

NAME = "accuracy"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_TEXT = os.path.normpath(os.path.join(_ROOT, "..", "shared", "data", "wikitext-2", "test.raw.txt"))
SIGNPOSTS = "/work/signposts"
#: evaluation texts, in table order: name -> what the report calls it
TEXTS = {"wikitext2": "WikiText-2 test", "docstrings": "Python stdlib docstrings"}
SEQLENS = (2048, 8192)
#: the smoke run: window lengths, windows per text, characters of the docstring text (byte ids, vocab 256)
SMOKE_SEQLENS, SMOKE_WINDOWS, SMOKE_CHARS = (32, 64), 2, 4000
#: optional per-method columns of evaluate_perplexity's results, shown when present
EXTRA_BITS = ("avg_bits_2k", "avg_bits_32k")
_RUN_DIR = re.compile(r"^(?P<text>[a-z0-9]+)-(?P<seqlen>\d+)$")


def _nuq(bits: int, signposts: str, slots: int) -> dict:
    return dict(bits=bits, signposts=signposts, outlier_slots=slots, sink_tokens=1, qnorm=False)


#: nuqX settings storable by KVQuantCache (slots, sink and qnorm are config knobs)
GROUPS = {
    "baselines": ["fp16", "int4", "kivi4", "kivi3", "kivi2", "kivi4-g128", "kivi2-g128"],
    "fp16": ["fp16"],
    "nuq-1pct": {f"nuq{b}-1%": _nuq(b, "smollm2-1pct", 1) for b in (4, 3, 2)},
    "nuq-0pct": {f"nuq{b}-0%": _nuq(b, "smollm2-0pct", 0) for b in (4, 3, 2)},
    "nuq-uniform": {f"nuq{b}-1%-uniform": _nuq(b, "smollm2-1pct-uu", 1) for b in (4, 3, 2)},
}
ORDER = ["fp16", "nuq4-1%", "nuq4-1%-uniform", "nuq4-0%", "int4", "kivi4", "kivi4-g128",
         "nuq3-1%", "nuq3-1%-uniform", "nuq3-0%", "int3", "kivi3",
         "nuq2-1%", "nuq2-1%-uniform", "nuq2-0%", "int2", "kivi2", "kivi2-g128"]
#: the accuracy each nuqX-1% aims for: at most this many % above fp16
TARGETS = {"nuq4-1%": 1.0, "nuq3-1%": 3.0, "nuq2-1%": 15.0}


def group_methods(group: str, signposts_root: str | None) -> tuple[list, dict]:
    """``(methods, signposts)`` arguments of ``evaluate_perplexity`` for one group (``signposts_root=None``:
    uncalibrated nuq methods, for smoke runs)."""
    entry = GROUPS[group]
    if isinstance(entry, list):
        return list(entry), {}
    methods, sps = [], {}
    for name, cfg in entry.items():
        methods.append(MethodSpec("nuq", cfg["bits"], outlier_slots=cfg["outlier_slots"],
                                  sink_tokens=cfg["sink_tokens"], qnorm=cfg["qnorm"], name=name))
        if signposts_root is not None:
            sps[name] = os.path.join(signposts_root, cfg["signposts"])
    return methods, sps


def run_dir(work_dir: str, text: str, seqlen: int) -> str:
    """The checkpoint folder of one (text, window length)."""
    return os.path.join(work_dir, f"{text}-{seqlen}")


def run_group(group: str, args: argparse.Namespace, model, ids, text: str, seqlen: int) -> None:
    """Evaluate one group on one (text, window length) into ``<run_dir>/<group>.json``, resuming from it."""
    folder = run_dir(args.work_dir, text, seqlen)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{group}.json")
    state = None
    if os.path.isfile(path):
        with open(path) as f:
            state = json.load(f)["results"]
    methods, sps = group_methods(group, None if args.smoke else args.signposts_root)
    meta = {"group": group, "text": text, "text_info": text_info(args.text_files[text]), "seqlen": seqlen,
            "command": " ".join(["python", *sys.argv]), "torch_threads": torch.get_num_threads(),
            "model_device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
            "signposts": sps, "windows_requested": args.windows}

    def checkpoint(res):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "results": res}, f, indent=1)
        os.replace(tmp, path)

    log = (lambda line: print(f"[{text} {seqlen} {group}] {line}", flush=True))
    res = evaluate_perplexity(model, ids, methods, seqlen=seqlen, windows=args.windows, signposts=sps or None,
                              progress=log, state=state, on_window=checkpoint)
    checkpoint(res)


def text_files(args: argparse.Namespace) -> dict[str, str]:
    """``{text: file}`` of the requested texts; the docstring text is built into ``--cache-dir`` when missing."""
    files = {}
    for text in args.texts:
        if text == "wikitext2":
            if not os.path.isfile(args.text_file):
                raise SystemExit(f"WikiText-2 test text {args.text_file!r} does not exist; pass --text-file PATH "
                                 "(test.raw.txt) or leave wikitext2 out of --texts.")
            files[text] = args.text_file
        elif args.docstrings_file:
            if not os.path.isfile(args.docstrings_file):
                raise SystemExit(f"docstring text {args.docstrings_file!r} does not exist; build it with python -m "
                                 "kvquant_hf.evaluation.docstring_text --output FILE, or leave out --docstrings-file.")
            files[text] = args.docstrings_file
        else:
            files[text] = docstring_text.ensure_corpus(
                args.cache_dir, SMOKE_CHARS if args.smoke else docstring_text.DEFAULT_MAX_CHARS)
    return files


def text_info(path: str) -> dict:
    """The file of a text and, for the docstring text, its record (``FILE.json``: Python version, size, hash)."""
    info = {"file": path}
    if os.path.isfile(path + ".json"):
        with open(path + ".json") as fh:
            info.update(json.load(fh))
    return info


def smoke_ids(path: str, n: int) -> torch.Tensor:
    """The first ``n`` UTF-8 bytes of a text as token ids (the tiny model's vocabulary is 256)."""
    with open(path, "rb") as f:
        data = f.read(n)
    if len(data) < n:
        raise SystemExit(f"{path!r} holds {len(data)} bytes, fewer than the {n} the smoke run needs.")
    return torch.tensor(list(data), dtype=torch.long)


def _text_order(text: str) -> tuple:
    return (list(TEXTS).index(text) if text in TEXTS else len(TEXTS), text)


def merge(work_dir: str) -> tuple[list[dict], dict]:
    """Rows (one per text, window length and method; window lengths, then texts, then methods in table order)
    and the metadata of the checkpoints in ``work_dir`` (per run and group, and the NLL of every window)."""
    runs = []
    for entry in sorted(os.listdir(work_dir)) if os.path.isdir(work_dir) else []:
        m = _RUN_DIR.match(entry)
        if m and os.path.isdir(os.path.join(work_dir, entry)):
            runs.append((int(m["seqlen"]), m["text"], entry))
    runs.sort(key=lambda r: (r[0], _text_order(r[1])))
    rows, metas, window_nll = [], {}, {}
    for seqlen, text, entry in runs:
        merged = {}
        for group in GROUPS:
            path = os.path.join(work_dir, entry, f"{group}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    data = json.load(f)
                metas.setdefault(entry, {})[group] = data["meta"]
                merged.update(data["results"])
        if not merged:
            continue
        if "fp16" not in merged:
            raise SystemExit(f"no fp16 results under {os.path.join(work_dir, entry)}; run the 'baselines' (or "
                             f"'fp16') group on text {text} at seqlen {seqlen} first.")
        base = merged["fp16"]["ppl"]
        window_nll[entry] = {n: r.get("window_nll") for n, r in merged.items()}
        for name in ORDER + [n for n in merged if n not in ORDER]:
            if name not in merged:
                continue
            r = merged[name]
            delta = 100 * (r["ppl"] / base - 1)
            row = {"text": text, "seqlen": seqlen, "method": name, "ppl": r["ppl"],
                   "delta_pct": None if name == "fp16" else delta, "avg_bits": r["avg_bits"],
                   **{k: r[k] for k in EXTRA_BITS if r.get(k) is not None},
                   "windows": r["windows"], "tokens": r["tokens"], "seconds": r.get("seconds"),
                   "calibration_s": r.get("calibration_s")}
            if name in TARGETS:
                row["target_pct"] = TARGETS[name]
                row["target_met"] = delta <= TARGETS[name]
            rows.append(row)
    if not rows:
        raise SystemExit(f"no results under {work_dir}; run the 'baselines' (or 'fp16') group first.")
    return rows, {"runs": metas, "window_nll": window_nll}


def _fmt_bits(v) -> str:
    return "" if v is None else f"{v:.3f}"


def render_seqlen(rows: list[dict], seqlen: int) -> list[str]:
    """The section of one window length: one PPL / vs fp16 column pair per text."""
    sel = [r for r in rows if r["seqlen"] == seqlen]
    texts = sorted({r["text"] for r in sel}, key=_text_order)
    methods = list(dict.fromkeys(r["method"] for r in sel))
    by = {(r["text"], r["method"]): r for r in sel}
    extra = [k for k in EXTRA_BITS if any(k in r for r in sel)]
    columns = ["method", "avg bits", *[f"bits {k.rsplit('_', 1)[1]}" for k in extra]]
    for t in texts:
        columns += [f"{t} PPL", f"{t} vs fp16"]
    columns.append("target")
    table = []
    for name in methods:
        first = next(by[(t, name)] for t in texts if (t, name) in by)
        line = {"method": name, "avg bits": _fmt_bits(first["avg_bits"])}
        for k in extra:
            line[f"bits {k.rsplit('_', 1)[1]}"] = _fmt_bits(first.get(k))
        verdicts = []
        for t in texts:
            r = by.get((t, name))
            line[f"{t} PPL"] = "" if r is None else f"{r['ppl']:.3f}"
            line[f"{t} vs fp16"] = "" if r is None or r["delta_pct"] is None else f"{r['delta_pct']:+.2f}%"
            if r is not None and "target_pct" in r:
                verdicts.append(f"{t} {'met' if r['target_met'] else 'missed'}")
        line["target"] = f"<= +{TARGETS[name]:g}%: {', '.join(verdicts)}" if verdicts else ""
        table.append(line)
    sizes = "; ".join(f"{TEXTS.get(t, t)}: {by[(t, 'fp16')]['windows']} windows ({by[(t, 'fp16')]['tokens']} "
                      "scored tokens)" for t in texts if (t, "fp16") in by)
    lines = [f"## Windows of {seqlen} tokens", "", sizes + ".", "", md_table(table, columns), "",
             "Same-bits comparison (nuqX-1% against intX and KIVI-X):", ""]
    for t in texts:
        for bits in (4, 3, 2):
            nuq = by.get((t, f"nuq{bits}-1%"))
            others = [(n, by[(t, n)]["ppl"]) for n in (f"int{bits}", f"kivi{bits}") if (t, n) in by]
            if nuq is None or not others:
                continue
            verdict = ", ".join(f"{n} {p:.3f} ({'beaten' if nuq['ppl'] < p else 'not beaten'})" for n, p in others)
            lines.append(f"- {t}: nuq{bits}-1% {nuq['ppl']:.3f} vs {verdict}")
    return lines + [""]


def render(rows: list[dict]) -> str:
    texts = sorted({r["text"] for r in rows}, key=_text_order)
    lines = [
        "# SmolLM2-135M-Instruct: perplexity with quantized KV caches", "",
        "Texts: " + "; ".join(f"`{t}` = {TEXTS.get(t, t)}" for t in texts) + ". The WikiText-2 test text is the "
        "paper's; the docstring text (English prose of the Python standard library's docstrings, "
        "`python -m kvquant_hf.evaluation.docstring_text`) is another domain, never used for calibration. "
        "Non-overlapping windows, PPL = exp(mean token NLL). Simulated quantization (`kvquant_hf.simulated`): each "
        "token attends to what token-by-token decoding through that cache computes: nuqX to the packed form of "
        "tokens more than 128 before it and exactly to the 128 before it (the default recent window), the sink and "
        "itself; KIVI-X (groups of 32 tokens, or 128 for `-g128`) to its 128-token full-precision residual, keys "
        "flushed in blocks of 128, values one by one, as KIVI's code does. The 'fp16' row is the unquantized "
        "model.", "",
    ]
    for seqlen in sorted({r["seqlen"] for r in rows}):
        lines += render_seqlen(rows, seqlen)
    lines += [
        "Average bits per stored K/V element (K and V averaged), every stored byte counted, at the window length "
        "and at 2K and 32K tokens: nuqX = X-bit codes + per-token value scale/zero (fp16) + outlier slots (fp16 "
        "value + uint8 channel per slot) + int32 position + the sink and the 128-token window at 1.5 times fp16 "
        "(pre-RoPE and rotated keys, values; window tokens are packed too); intX = X + 32/head_dim (fp16 scale and "
        "zero per head vector); KIVI-X keys X + 32/group (fp16 scale and zero per channel and group), values "
        "X + 32/min(group, head_dim), the residual in fp16. head_dim = 64.",
        "",
        "Settings: nuq methods use the signposts `calibrate.py` writes by default (16 windows x 2048 tokens of the "
        "WikiText-2 validation text; Fisher-weighted k-means value tables; key tables uniform at 4 and 3 bits, "
        "k-means at 2 bits; per-channel pre-RoPE key thresholds at the 0.5/99.5th percentiles), 1 sink token, one "
        "outlier slot per token and head, a 128-token recent window.",
    ]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", nargs="+", default=["baselines", "nuq-1pct"], choices=list(GROUPS))
    p.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS), help="evaluation texts")
    p.add_argument("--text-file", default=TEST_TEXT, help="the WikiText-2 test text (test.raw.txt)")
    p.add_argument("--docstrings-file", default=None,
                   help="the docstring text (default: built into --cache-dir by kvquant_hf.evaluation.docstring_text)")
    p.add_argument("--cache-dir", default=None,
                   help="where the docstring text is built (default: ~/.cache/kvquant_hf; for --smoke: "
                        "<work dir>/texts)")
    p.add_argument("--seqlens", type=int, nargs="+", default=list(SEQLENS), help="window lengths (one table each)")
    p.add_argument("--windows", type=int, default=None, help="first N windows (default: the whole text)")
    p.add_argument("--signposts-root", default=SIGNPOSTS)
    p.add_argument("--work-dir", default=None, help="checkpoints (resumable); default: a temporary folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest when shared)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the simulated caches run on the model's device)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument("--render-only", action="store_true", help="only merge the checkpoints of --work-dir")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random model on the texts' first bytes, uncalibrated nuq (checks the script, not the "
                        "accuracy)")
    args = p.parse_args(argv)
    if any(s < 2 for s in args.seqlens):
        p.error(f"--seqlens {args.seqlens}: every window length must be at least 2 tokens.")
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.work_dir = tmp.name
    os.makedirs(args.work_dir, exist_ok=True)
    args.text_files = {}
    if not args.render_only:
        torch.set_num_threads(args.threads)
        t0 = time.time()
        if args.smoke:
            args.seqlens, args.windows = list(SMOKE_SEQLENS), SMOKE_WINDOWS
            args.groups = ["baselines", "nuq-1pct"]
            args.cache_dir = args.cache_dir or os.path.join(args.work_dir, "texts")
            args.text_files = text_files(args)
            model = random_model("tiny", dtype=torch.float32, device="cpu")
            ids = {t: smoke_ids(f, max(args.seqlens) * args.windows) for t, f in args.text_files.items()}
        else:
            from kvquant_hf.evaluation.perplexity import load_token_ids, tune_cpu_allocator
            from kvquant_hf.models.loading import load_model_and_tokenizer

            tune_cpu_allocator()
            args.text_files = text_files(args)
            model, tok = load_model_and_tokenizer("smollm2", dtype=args.dtype, device=args.device)
            ids = {t: load_token_ids(tok, text_file=f) for t, f in args.text_files.items()}
        for t, x in ids.items():
            print(f"{t}: {x.numel()} tokens (" + ", ".join(f"{x.numel() // s} windows of {s}" for s in args.seqlens)
                  + f"), loaded in {time.time() - t0:.0f} s", flush=True)
        for text in args.texts:
            for seqlen in args.seqlens:
                for group in args.groups:
                    run_group(group, args, model, ids[text], text, seqlen)
    rows, metas = merge(args.work_dir)
    texts_meta = {m["text"]: m.get("text_info") for groups in metas["runs"].values() for m in groups.values()}
    write_result(NAME, rows, render(rows), meta={**metas, "texts": texts_meta, "smoke": args.smoke},
                 device="cpu" if args.smoke else args.device)
    if tmp is not None:
        tmp.cleanup()
    return rows


if __name__ == "__main__":
    main()
