"""Plots of the committed results: reads ``benchmarks/results/*.json|csv``, writes ``benchmarks/results/plots/*.png``.

    python benchmarks/plots.py            # all three plots
    python benchmarks/plots.py --only accuracy

* ``accuracy_smollm2.png``: WikiText-2 PPL change vs fp16 per method and bit width (``accuracy_smollm2.json``).
* ``decode_kernel_128k.png``: one decode attention call at 128K tokens, fp16 SDPA vs the nuq4/nuq2 kernels before
  (``decode_attention.csv``) and after (``decode_attention_new.csv``) the fp16 decode fast path.
* ``capacity_h200.png``: tokens of Llama-3-8B context that fit on 1 and 2 H200s per method (measured:
  ``capacity.json``, ``capacity_fp16.json``, ``multi_gpu_capacity.json``; the rest: planner predictions from
  ``plan_table.md``, drawn hatched).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PLOTS = os.path.join(RESULTS, "plots")

COLORS = {"nuq": "#1f77b4", "nuq-tuned": "#6baed6", "int": "#d62728", "kivi": "#ff7f0e", "fp16": "#7f7f7f"}


def _load_json(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def accuracy_rows(results_dir: str = RESULTS) -> list[dict]:
    """``[{"family", "bits", "method", "ppl", "delta_pct"}]`` from ``accuracy_smollm2.json``."""
    with open(os.path.join(results_dir, "accuracy_smollm2.json")) as f:
        d = json.load(f)
    base = d["fp16_ppl"]
    rows = []
    for name, r in d["results"].items():
        m = re.match(r"(nuq|int|kivi)(\d)(.*)", name)
        if not m:
            continue
        family = m.group(1)
        if family == "nuq" and "tuned" in m.group(3):
            family = "nuq-tuned"
        rows.append({"family": family, "bits": int(m.group(2)), "method": name, "ppl": r["ppl"],
                     "delta_pct": 100.0 * (r["ppl"] / base - 1.0)})
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
    # one group per bit width; bars: nuqX-1%, best tuned nuq, intX, KIVI-X
    order = [("nuq", "nuqX-1% (calibrate.py)"), ("nuq-tuned", "nuqX tuned, 2 slots"), ("kivi", "KIVI-X-style"),
             ("int", "intX per token")]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.2
    for i, (fam, label) in enumerate(order):
        xs, ys = [], []
        for j, bits in enumerate((4, 3, 2)):
            sel = [r for r in rows if r["family"] == fam and r["bits"] == bits]
            if fam == "nuq-tuned":
                sel = [r for r in sel if "2slots" in r["method"]]
            if not sel:
                continue
            xs.append(j + (i - 1.5) * width)
            ys.append(sel[0]["delta_pct"])
        ax.bar(xs, ys, width, label=label, color=COLORS[fam])
        for x, y in zip(xs, ys):
            ax.text(x, min(y, 190) * 1.04 + 1, f"{y:+.0f}%" if abs(y) >= 10 else f"{y:+.1f}%", ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(3), ["4 bits", "3 bits", "2 bits"])
    ax.set_ylabel("PPL change vs fp16 (%)")
    ax.set_ylim(0, 200)
    d = _load_json("accuracy_smollm2.json")
    fp16 = d["results"]["fp16"]
    off = ", ".join(f"{r['method']} {r['delta_pct']:+.0f}%" for r in rows if r["delta_pct"] > 200
                    and any(r["family"] == fam for fam, _ in order))
    ax.set_title(f"SmolLM2-135M, WikiText-2 test ({fp16['windows']} x {fp16['seqlen']}), fp16 PPL {d['fp16_ppl']:.2f}"
                 + (f"\n({off} off the scale)" if off else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, ax, path)


def _csv_rows(name: str) -> list[dict]:
    with open(os.path.join(RESULTS, name), newline="") as f:
        return list(csv.DictReader(f))


def kernel_times_128k() -> dict[str, dict[str, float]]:
    """``{"old"|"new"|"cuda": {method: us}}`` at batch 1, context 131072 (default-config rows, no sweeps)."""
    out: dict[str, dict[str, float]] = {}
    for key, name in (("old", "decode_attention.csv"), ("new", "decode_attention_new.csv"),
                      ("cuda", "decode_attention_cuda_final5.csv")):
        out[key] = {}
        for r in _csv_rows(name):
            if r["batch"] == "1" and r["context"] == "131072" and r["method"] in ("fp16 SDPA", "nuq4-1%", "nuq2-1%"):
                out[key].setdefault(r["method"], float(r["us"]))
    return out


def plot_kernel(path: str) -> str:
    t = kernel_times_128k()
    labels = ["fp16 SDPA", "nuq4-1%", "nuq2-1%"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.27
    series = (("old", "Triton general kernel (decode_attention.md, eager)", "#bbbbbb"),
              ("new", "Triton fp16 fast path (decode_attention_new.md, graph)", "#1f77b4"),
              ("cuda", "CUDA tensor-core kernel (decode_attention_cuda_final5.md, graph)", "#2ca02c"))
    for i, (key, label, color) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(labels))]
        ys = [t[key].get(m, float("nan")) for m in labels]
        ax.bar(xs, ys, width, label=label, color=color)
        for x, y in zip(xs, ys):
            ax.text(x, y + 10, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("us per call (lower is better)")
    ax.set_ylim(0, 1.3 * max(max(v.values()) for v in t.values()))
    ax.set_title("Decode attention, one layer, Llama-3-8B shape, batch 1, 128K tokens (H200, fp16)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, ax, path)


def capacity_tokens() -> dict[tuple[int, str], tuple[int, bool]]:
    """``{(gpus, method): (tokens, measured)}`` for Llama-3-8B bf16 on H200s."""
    out: dict[tuple[int, str], tuple[int, bool]] = {}
    with open(os.path.join(RESULTS, "plan_table.md")) as f:
        for line in f:
            m = re.match(r"\| Llama-3-8B \(bf16\) \| (\d) \| (\S+) \| [\d,]+ \| ([\d,]+) \|", line)
            if m:
                method = m.group(2).replace("-1%", "")
                out[(int(m.group(1)), method)] = (int(m.group(3).replace(",", "")), False)
    for gpus, name in ((1, "capacity.json"), (1, "capacity_fp16.json"), (2, "multi_gpu_capacity.json")):
        for r in _load_json(name)["rows"]:
            if r.get("section") == "capacity" and r.get("measured_tokens"):
                out[(gpus, r["method"])] = (int(r["measured_tokens"]), True)
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
                   hatch=None if measured else "//", label=None)
            ax.text(x, tokens / 1e6 + 0.15, f"{tokens / 1e6:.2f}M", ha="center", va="bottom", fontsize=7)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#1f77b4", label="1 x H200, measured"),
                       Patch(color="#2ca02c", label="2 x H200, measured"),
                       Patch(facecolor="white", edgecolor="#2ca02c", hatch="//", label="2 x H200, planner (not run)")],
              fontsize=8, loc="upper left")
    ax.set_xticks(range(len(methods)), ["fp16 DynamicCache", "nuq4-1%", "nuq3-1%", "nuq2-1%"])
    ax.set_ylabel("context tokens that fit (millions)")
    ax.set_title("Llama-3-8B shape (bf16), batch 1: longest context that allocates and decodes", fontsize=9)
    return _save(fig, ax, path)


PLOTTERS = {"accuracy": ("accuracy_smollm2.png", plot_accuracy),
            "kernel": ("decode_kernel_128k.png", plot_kernel),
            "capacity": ("capacity_h200.png", plot_capacity)}


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(PLOTTERS), nargs="*")
    ap.add_argument("--out-dir", default=PLOTS)
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    written = []
    for key in args.only or PLOTTERS:
        name, fn = PLOTTERS[key]
        written.append(fn(os.path.join(args.out_dir, name)))
        print("wrote", written[-1])
    return written


if __name__ == "__main__":
    main()
