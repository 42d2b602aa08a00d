"""WikiText-2 perplexity of SmolLM2-135M-Instruct with KVQuant (simulated) against intX and KIVI baselines.

The paper protocol on the *whole* test text (``test.raw.txt``): tokenize it once, non-overlapping windows of
2048 tokens, ``PPL = exp(mean token NLL)``. Every method goes through the same patched attention and the
simulated caches of :mod:`kvquant_hf.simulated` (decode-equivalent: each token attends to the quantized
history and to itself exactly), on CPU in float32.

Methods (groups can run as separate processes; each checkpoints after every window and resumes):

* ``baselines``: fp16 (unquantized), int4/int3/int2 (uniform, per token, post-RoPE keys), KIVI-4/KIVI-2
  (keys per channel in groups of 32 tokens after RoPE, values per token; no fp16 residual).
* ``nuq-1pct``: nuq4/nuq3/nuq2 with 1% outliers (one exact slot per token and head at head_dim 64), the
  settings of :data:`NUQ_1PCT` (chosen in ``ablation_smollm2.py``).
* ``nuq-0pct``: nuq4/nuq3/nuq2 without outliers (0% signposts: key thresholds at min/max).

Usage::

    python benchmarks/accuracy_smollm2.py --groups baselines &     # each group ~1 CPU core for hours
    python benchmarks/accuracy_smollm2.py --groups nuq-1pct nuq-0pct &
    python benchmarks/accuracy_smollm2.py --render-only            # merge into results/accuracy_smollm2.md

``--windows 8`` gives the quick first-8-windows numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch

from kvquant_hf.simulated import MethodSpec

TEST_TEXT = os.path.normpath(os.path.join(_ROOT, "..", "shared", "data", "wikitext-2", "test.raw.txt"))
SIGNPOSTS = "/work/signposts"
RESULTS = os.path.join(_ROOT, "benchmarks", "results")

#: nuqX with 1% outliers: settings storable by KVQuantCache (slots, sink and qnorm are config knobs).
NUQ_1PCT = {
    "nuq4-1%": dict(bits=4, signposts="smollm2-1pct", outlier_slots=1, sink_tokens=1, qnorm=False),
    "nuq3-1%": dict(bits=3, signposts="smollm2-1pct", outlier_slots=1, sink_tokens=1, qnorm=False),
    "nuq2-1%": dict(bits=2, signposts="smollm2-1pct", outlier_slots=1, sink_tokens=1, qnorm=False),
}
NUQ_0PCT = {
    "nuq4-0%": dict(bits=4, signposts="smollm2-0pct", outlier_slots=0, sink_tokens=1, qnorm=False),
    "nuq3-0%": dict(bits=3, signposts="smollm2-0pct", outlier_slots=0, sink_tokens=1, qnorm=False),
    "nuq2-0%": dict(bits=2, signposts="smollm2-0pct", outlier_slots=0, sink_tokens=1, qnorm=False),
}
#: the tuned calibration (benchmarks/signpost_variants_smollm2.py: Fisher-optimized per-channel key thresholds,
#: uniform tables): 1 slot per token and head (1.6% of head_dim 64) and 2 slots (3.1%)
NUQ_TUNED = {
    "nuq4-1%-tuned": dict(bits=4, signposts="smollm2-1pct-optu", outlier_slots=1, sink_tokens=1, qnorm=False),
    "nuq3-1%-tuned": dict(bits=3, signposts="smollm2-1pct-optu", outlier_slots=1, sink_tokens=1, qnorm=False),
    "nuq2-1%-tuned": dict(bits=2, signposts="smollm2-1pct-optu", outlier_slots=1, sink_tokens=1, qnorm=False),
    "nuq4-2slots-tuned": dict(bits=4, signposts="smollm2-1pct-optu", outlier_slots=2, sink_tokens=1, qnorm=False),
    "nuq3-2slots-tuned": dict(bits=3, signposts="smollm2-1pct-optu", outlier_slots=2, sink_tokens=1, qnorm=False),
    "nuq2-2slots-tuned": dict(bits=2, signposts="smollm2-1pct-optu", outlier_slots=2, sink_tokens=1, qnorm=False),
}
#: the reference calibration's thresholds with uniform key and value tables (``calibrate.py --key-table uniform
#: --value-table uniform``): the tables the CUDA decode kernel needs no lookups for
NUQ_UNIFORM = {
    "nuq4-1%-uniform": dict(bits=4, signposts="smollm2-1pct-uu", outlier_slots=1, sink_tokens=1, qnorm=False),
    "nuq3-1%-uniform": dict(bits=3, signposts="smollm2-1pct-uu", outlier_slots=1, sink_tokens=1, qnorm=False),
    "nuq2-1%-uniform": dict(bits=2, signposts="smollm2-1pct-uu", outlier_slots=1, sink_tokens=1, qnorm=False),
}
GROUPS = {
    "baselines": ["fp16", "int4", "int3", "int2", "kivi4", "kivi2"],
    "fp16": ["fp16"],
    "nuq-1pct": NUQ_1PCT,
    "nuq-0pct": NUQ_0PCT,
    "nuq-tuned": NUQ_TUNED,
    "nuq-uniform": NUQ_UNIFORM,
}
ORDER = ["fp16", "nuq4-1%", "nuq4-1%-uniform", "nuq4-1%-tuned", "nuq4-2slots-tuned", "nuq4-0%", "int4", "kivi4",
         "nuq3-1%", "nuq3-1%-uniform", "nuq3-1%-tuned", "nuq3-2slots-tuned", "nuq3-0%", "int3",
         "nuq2-1%", "nuq2-1%-uniform", "nuq2-1%-tuned", "nuq2-2slots-tuned", "nuq2-0%", "int2", "kivi2"]
TARGETS = {"nuq4-1%": 1.0, "nuq3-1%": 3.0, "nuq2-1%": 15.0}  # max % above fp16 (issue "Foundation")


def group_methods(group: str, signposts_root: str) -> tuple[list, dict]:
    """``(methods, signposts)`` arguments of ``evaluate_perplexity`` for one group."""
    entry = GROUPS[group]
    if isinstance(entry, list):
        return list(entry), {}
    methods, sps = [], {}
    for name, cfg in entry.items():
        methods.append(MethodSpec("nuq", cfg["bits"], outlier_slots=cfg["outlier_slots"],
                                  sink_tokens=cfg["sink_tokens"], qnorm=cfg["qnorm"], name=name))
        sps[name] = os.path.join(signposts_root, cfg["signposts"])
    return methods, sps


def run_group(group: str, args: argparse.Namespace, model, tok, ids) -> None:
    from kvquant_hf.evaluation import evaluate_perplexity

    path = os.path.join(args.work_dir, f"{group}.json")
    state = None
    if os.path.isfile(path):
        with open(path) as f:
            state = json.load(f)["results"]
    methods, sps = group_methods(group, args.signposts_root)
    meta = {"group": group, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "torch_threads": torch.get_num_threads(),
            "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "signposts": sps, "windows_requested": args.windows}

    def checkpoint(res):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "results": res}, f, indent=1)
        os.replace(tmp, path)

    log = (lambda line: print(f"[{group}] {line}", flush=True))
    res = evaluate_perplexity(model, ids, methods, seqlen=args.seqlen, windows=args.windows, signposts=sps or None,
                              progress=log, state=state, on_window=checkpoint)
    checkpoint(res)


def _where(metas: dict) -> str:
    """Where the groups ran, e.g. 'cuda (NVIDIA H200), torch.float32 model'."""
    seen = sorted({f"{m.get('device', 'cpu')}{' (' + m['gpu'] + ')' if m.get('gpu') and 'cuda' in str(m.get('device')) else ''}"
                   f", {m.get('dtype', 'torch.float32')} model" for m in metas.values()})
    return "; ".join(seen)


def _fmt_delta(ppl: float, base: float) -> str:
    return f"{100 * (ppl / base - 1):+.2f}%"


def render(args: argparse.Namespace) -> None:
    """Merge the group checkpoints into ``results/accuracy_smollm2.{md,json}``."""
    merged, metas = {}, {}
    for group in GROUPS:
        path = os.path.join(args.work_dir, f"{group}.json")
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            metas[group] = data["meta"]
            merged.update(data["results"])
    if "fp16" not in merged:
        raise SystemExit(f"no fp16 results under {args.work_dir}; run the 'baselines' group first.")
    n_win = merged["fp16"]["windows"]
    base = merged["fp16"]["ppl"]
    cal = {}
    for name, res in merged.items():
        if res.get("calibration_s") is not None:
            cal[name] = res["calibration_s"]
    lines = [
        "# SmolLM2-135M-Instruct: WikiText-2 perplexity with quantized KV caches",
        "",
        f"Whole WikiText-2 test text (`test.raw.txt`, {merged['fp16']['tokens'] + n_win} tokens in {n_win} "
        f"non-overlapping windows of {merged['fp16']['seqlen']}; {merged['fp16']['tokens']} scored tokens), "
        "PPL = exp(mean token NLL). Simulated quantization (`kvquant_hf.simulated`): every token attends to the "
        "quantized K/V of earlier tokens and to its own exact K/V, i.e. what token-by-token decoding through "
        "`KVQuantCache` computes (checked equal to the real cache in `tests/test_perplexity.py`). "
        f"{_where(metas)} (the 'fp16' row is the unquantized model).",
        "",
        "| method | PPL | delta vs fp16 | avg bits | windows | target |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name in ORDER + [n for n in merged if n not in ORDER]:
        if name not in merged:
            continue
        r = merged[name]
        delta = "" if name == "fp16" else _fmt_delta(r["ppl"], base)
        target = ""
        if name in TARGETS:
            ok = 100 * (r["ppl"] / base - 1) <= TARGETS[name]
            target = f"<= +{TARGETS[name]:g}%: {'met' if ok else 'MISSED'}"
        partial = "" if r["windows"] == n_win else " (partial)"
        lines.append(f"| {name} | {r['ppl']:.3f} | {delta} | {r['avg_bits']:.3f} | {r['windows']}{partial} | {target} |")
    # nuqX-1% vs intX / KIVI-X at the same X
    lines += ["", "Same-bits comparison (nuqX-1% must beat intX and KIVI-X):", ""]
    for bits in (4, 3, 2):
        nuq = merged.get(f"nuq{bits}-1%")
        if nuq is None:
            continue
        others = [(n, merged[n]["ppl"]) for n in (f"int{bits}", f"kivi{bits}") if n in merged]
        if not others:  # (the baselines group did not run into this work dir)
            lines.append(f"- nuq{bits}-1% {nuq['ppl']:.3f}: no intX / KIVI-X run here (`accuracy_smollm2.md` has them)")
            continue
        verdict = ", ".join(f"{n} {p:.3f} ({'beaten' if nuq['ppl'] < p else 'NOT beaten'})" for n, p in others)
        lines.append(f"- nuq{bits}-1% {nuq['ppl']:.3f} vs {verdict}")
    lines += [
        "",
        "Average bits per stored K/V element (K and V averaged): nuqX = X-bit codes + per-token value scale/zero "
        "(fp16) + outlier slots (fp16 value + uint8 channel per slot) + the fp16 sink token's share of the 2048 "
        "window (per-channel key thresholds are per layer: no per-token cost); intX = X + 32/head_dim "
        "(fp16 scale and zero per head vector); KIVI-X keys X + 2*16/32 (scale/zero per channel per 32-token "
        "group), values X + 32/head_dim. head_dim = 64.",
        "",
        "Settings: nuq methods use calibrated signposts (16 windows x 2048 tokens of the WikiText-2 validation "
        "text, Fisher-weighted k-means, per-channel pre-RoPE key thresholds at the 0.5/99.5th percentiles for 1%, "
        "min/max for 0%), 1 sink token, outlier slots = ceil(fraction * head_dim) (1 for 1%, 0 for 0%).",
    ]
    for name, cfg in {**NUQ_1PCT, **NUQ_0PCT, **NUQ_TUNED}.items():
        if name in merged:
            lines.append(f"- {name}: {cfg}")
    if cal:
        folders: dict[str, tuple[float, list[str]]] = {}
        for meta in metas.values():
            for name, folder in (meta.get("signposts") or {}).items():
                if name in cal:
                    folders.setdefault(folder, (cal[name], []))[1].append(name)
        lines += ["", "Calibration time (signposts' metadata `calibration.duration_s`, wall clock on the shared CPU; "
                  "one capture pass serves all bit widths of a folder):", ""]
        for folder, (sec, names) in folders.items():
            lines.append(f"- `{folder}` ({', '.join(names)}): {sec:.0f} s")
    lines += ["", "## How this was made", ""]
    for group, meta in metas.items():
        lines.append(f"- `{group}`: `{meta.get('command')}` (started {meta.get('started')}, "
                     f"torch threads {meta.get('torch_threads')})")
    if any("cuda" in str(m.get("device")) for m in metas.values()):
        lines.append("- on the GPU machine all groups ran at once through `bash benchmarks/run_accuracy_gpu.sh` "
                     "(two device calls: the model travels in two halves, see the script's header)")
    lines += [
        f"- rendered {datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}); "
        "`python benchmarks/accuracy_smollm2.py --render-only`",
        "- seconds per method (all windows): "
        + ", ".join(f"{n} {merged[n]['seconds']:.0f}" for n in merged),
    ]
    os.makedirs(RESULTS, exist_ok=True)
    md_path = os.path.join(RESULTS, args.name + ".md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    slim = {n: {k: v for k, v in r.items() if k != "window_nll"} | {"window_nll": r["window_nll"]}
            for n, r in merged.items()}
    with open(os.path.join(RESULTS, args.name + ".json"), "w") as f:
        json.dump({"meta": metas, "fp16_ppl": base, "results": slim}, f, indent=1)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--text-file", default=TEST_TEXT)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="first N windows (default: the whole text)")
    p.add_argument("--signposts-root", default=SIGNPOSTS)
    p.add_argument("--work-dir", default="/work/runs/accuracy_smollm2", help="per-group checkpoints (resumable)")
    p.add_argument("--name", default="accuracy_smollm2", help="results/<name>.md and .json")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest when shared)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the simulated caches run on the model's device)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    if not args.render_only:
        from kvquant_hf.evaluation.perplexity import load_token_ids, tune_cpu_allocator
        from kvquant_hf.models.loading import load_model_and_tokenizer

        torch.set_num_threads(args.threads)
        tune_cpu_allocator()
        t0 = time.time()
        model, tok = load_model_and_tokenizer("smollm2", dtype=args.dtype, device=args.device)
        ids = load_token_ids(tok, text_file=args.text_file)
        print(f"loaded model and {ids.numel()} tokens in {time.time() - t0:.0f} s "
              f"({ids.numel() // args.seqlen} windows of {args.seqlen})", flush=True)
        for group in args.groups:
            run_group(group, args, model, tok, ids)
    render(args)


if __name__ == "__main__":
    main()
