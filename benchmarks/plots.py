"""Plots of the latest results: reads ``benchmarks/results/<name>.json``, writes ``benchmarks/figures/*.png``.

    python -m benchmarks.plots            # all three plots
    python -m benchmarks.plots --only accuracy

* ``accuracy.png``: WikiText-2 PPL change vs fp16 per method and bit width (``accuracy.json``).
* ``decode_attention.png``: one decode attention call at batch 1 per context, fp16 SDPA vs nuq4/nuq3/nuq2
  (``decode_attention.json``).
* ``capacity.png``: tokens of Llama-3-8B context that fit on 1 and 2 GPUs per method (measured rows of
  ``capacity.json``; where a count was not measured, the planner's prediction, drawn hatched).
"""

from __future__ import annotations

import argparse
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from benchmarks.common import read_result, results_dir

COLORS = {"nuq": "#1f77b4", "nuq-uniform": "#6baed6", "int": "#d62728", "kivi": "#ff7f0e", "fp16": "#7f7f7f"}


def _wikitext_2048(row: dict) -> bool:
    """Whether an accuracy row is of the WikiText-2 test text in windows of 2048 tokens (what the plot shows)."""
    return row.get("text", "wikitext2") == "wikitext2" and row.get("seqlen", 2048) == 2048


def accuracy_rows() -> list[dict]:
    """``[{"family", "bits", "method", "ppl", "delta_pct"}]`` of the quantized methods in ``accuracy.json``."""
    rows = []
    for r in read_result("accuracy")["rows"]:
        if not _wikitext_2048(r):
            continue
        m = re.match(r"(nuq|int|kivi)(\d)(.*)", r["method"])
        if not m or r["delta_pct"] is None:
            continue
        family = m.group(1) + ("-uniform" if "uniform" in m.group(3) else "")
        if m.group(3) not in ("", "-1%", "-1%-uniform"):
            continue
        rows.append({"family": family, "bits": int(m.group(2)), "method": r["method"], "ppl": r["ppl"],
                     "delta_pct": r["delta_pct"]})
    return rows


def _save(fig, ax, path: str) -> str:
    """Common finish of every plot: y grid, tight layout, PNG at 110 dpi; returns ``path``."""
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(path: str) -> str:
    rows = accuracy_rows()
    order = [("nuq", "nuqX-1% (calibrate.py)"), ("nuq-uniform", "nuqX-1%, uniform tables"), ("kivi", "KIVI-X-style"),
             ("int", "intX per token")]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.2
    for i, (fam, label) in enumerate(order):
        xs, ys = [], []
        for j, bits in enumerate((4, 3, 2)):
            sel = [r for r in rows if r["family"] == fam and r["bits"] == bits]
            if sel:
                xs.append(j + (i - 1.5) * width)
                ys.append(sel[0]["delta_pct"])
        ax.bar(xs, ys, width, label=label, color=COLORS[fam])
        for x, y in zip(xs, ys):
            ax.text(x, min(y, 190) * 1.04 + 1, f"{y:+.0f}%" if abs(y) >= 10 else f"{y:+.1f}%", ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(3), ["4 bits", "3 bits", "2 bits"])
    ax.set_ylabel("PPL change vs fp16 (%)")
    ax.set_ylim(0, 200)
    fp16 = next(r for r in read_result("accuracy")["rows"] if r["method"] == "fp16" and _wikitext_2048(r))
    off = ", ".join(f"{r['method']} {r['delta_pct']:+.0f}%" for r in rows if r["delta_pct"] > 200)
    ax.set_title(f"SmolLM2-135M, WikiText-2 test ({fp16['windows']} x {fp16['seqlen']}), fp16 PPL {fp16['ppl']:.2f}"
                 + (f"\n({off} off the scale)" if off else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, ax, path)


def decode_attention_us(batch: int = 1) -> dict[str, dict[int, float]]:
    """``{method: {context: us}}`` of the attention rows of ``decode_attention.json`` at ``batch``."""
    out: dict[str, dict[int, float]] = {}
    for r in read_result("decode_attention")["rows"]:
        if r.get("section") == "attention" and r["batch"] == batch:
            out.setdefault(r["method"], {})[r["context"]] = r["us"]
    return out


def plot_decode_attention(path: str) -> str:
    data = decode_attention_us()
    result = read_result("decode_attention")
    contexts = sorted({c for v in data.values() for c in v})
    methods = [m for m in ("fp16 SDPA", "nuq4-1%", "nuq3-1%", "nuq2-1%") if m in data]
    colors = {"fp16 SDPA": "#7f7f7f", "nuq4-1%": "#1f77b4", "nuq3-1%": "#9467bd", "nuq2-1%": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(contexts))]
        ys = [data[m].get(c, float("nan")) for c in contexts]
        ax.bar(xs, ys, width, label=m, color=colors[m])
    ax.set_yscale("log")
    ax.set_xticks(range(len(contexts)), [f"{c // 1024}K" for c in contexts])
    ax.set_ylabel("us per call, CUDA-graph replay (log scale)")
    ax.set_title(f"Decode attention, one layer, Llama-3-8B shape, batch 1 ({result['device']}, "
                 f"{result['meta'].get('dtype', 'float16')})", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, ax, path)


def capacity_tokens() -> dict[tuple[int, str], tuple[int, bool]]:
    """``{(gpus, method): (tokens, measured)}`` for Llama-3-8B (bf16): measured rows, else planner predictions."""
    out: dict[tuple[int, str], tuple[int, bool]] = {}
    rows = read_result("capacity")["rows"]
    for r in rows:
        if r["section"] == "plan" and r["model"].startswith("Llama-3-8B") and r["gpus"] in (1, 2):
            out[(r["gpus"], r["method"].replace("-1%", ""))] = (int(r["predicted_tokens"]), False)
    for r in rows:
        if r["section"] in ("capacity", "multi_gpu") and isinstance(r.get("measured_tokens"), int):
            gpus = 1 if r["section"] == "capacity" else len(r.get("predicted_per_device") or {0: 0, 1: 0})
            out[(gpus, r["method"])] = (r["measured_tokens"], True)
    return out


def plot_capacity(path: str) -> str:
    cap = capacity_tokens()
    methods = ["fp16", "nuq4", "nuq3", "nuq2"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, (gpus, color) in enumerate(((1, "#1f77b4"), (2, "#2ca02c"))):
        for j, m in enumerate(methods):
            if (gpus, m) not in cap:
                continue
            tokens, measured = cap[(gpus, m)]
            x = j + (i - 0.5) * width
            ax.bar(x, tokens / 1e6, width, color=color if measured else "white", edgecolor=color,
                   hatch=None if measured else "//")
            ax.text(x, tokens / 1e6 + 0.15, f"{tokens / 1e6:.2f}M", ha="center", va="bottom", fontsize=7)
    ax.legend(handles=[Patch(color="#1f77b4", label="1 GPU, measured"),
                       Patch(color="#2ca02c", label="2 GPUs, measured"),
                       Patch(facecolor="white", edgecolor="#2ca02c", hatch="//", label="planner prediction")],
              fontsize=8, loc="upper left")
    ax.set_xticks(range(len(methods)), ["fp16 DynamicCache", "nuq4-1%", "nuq3-1%", "nuq2-1%"])
    ax.set_ylabel("context tokens that fit (millions)")
    ax.set_title(f"Llama-3-8B shape (bf16), batch 1: longest context that allocates and decodes\n"
                 f"({read_result('capacity')['device']})", fontsize=9)
    return _save(fig, ax, path)


PLOTTERS = {"accuracy": ("accuracy.png", plot_accuracy),
            "decode_attention": ("decode_attention.png", plot_decode_attention),
            "capacity": ("capacity.png", plot_capacity)}


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(PLOTTERS), nargs="*")
    ap.add_argument("--out-dir", default=None, help="default: benchmarks/figures")
    args = ap.parse_args(argv)
    out_dir = args.out_dir or os.path.join(os.path.dirname(results_dir()), "figures")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key in args.only or PLOTTERS:
        name, fn = PLOTTERS[key]
        written.append(fn(os.path.join(out_dir, name)))
        print("wrote", written[-1])
    return written


if __name__ == "__main__":
    main()
