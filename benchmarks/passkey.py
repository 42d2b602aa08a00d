"""Passkey retrieval on SmolLM2 with the real cache: per (length, depth) cell, how many of ``--trials`` keys each
method retrieves, against fp16 (a method is "within tolerance" in a cell when it is at most ``--tolerance`` trials
from fp16's count).

Each method runs as its own process of ``python -m kvquant_hf.evaluation.passkey`` (all at once: one GPU holds
them; each writes ``<run-dir>/<method>.json`` after every cell), then the per-method files are merged into one
table. ``--merge-only`` merges an existing folder of such files (file stem = column name, ``fp16.json`` needed).

Usage (the 2K/4K/8K x 5 depths x 10 trials grid: about 9 minutes on one H100, all methods at once)::

    PYTHONPATH=. python -m benchmarks.passkey --signposts S --device cuda [--lengths 2048 4096 8192]
    python -m benchmarks.passkey --merge-only RUN_DIR
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

from benchmarks.common import md_table, write_result

NAME = "passkey"


def load(folder: str) -> dict[str, dict]:
    """``{run name (file stem): {"config": ..., "cells": {(length, depth): correct}, "trials": ...}}``."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as fh:
            doc = json.load(fh)
        (method, res), = doc["methods"].items()
        runs[os.path.splitext(os.path.basename(path))[0]] = {
            "method": method, "config": doc["config"], "complete": doc.get("complete", False),
            "cells": {(c["length"], c["depth"]): (c["correct"], c["trials"]) for c in res["cells"]}}
    return runs


def build(runs: dict[str, dict], tolerance: int = 1) -> tuple[list[dict], dict]:
    if "fp16" not in runs:
        raise SystemExit("no fp16.json in the folder: the table compares every method with fp16")
    names = ["fp16"] + [n for n in runs if n != "fp16"]
    cells = sorted(runs["fp16"]["cells"])
    rows, summary = [], {n: {"correct": 0, "trials": 0, "cells_within": 0, "cells": 0} for n in names}
    for cell in cells:
        ref = runs["fp16"]["cells"][cell][0]
        row = {"length": cell[0], "depth": f"{cell[1]:.2f}"}
        for n in names:
            got = runs[n]["cells"].get(cell)
            if got is None:
                row[n] = "not run"
                continue
            row[n] = f"{got[0]}/{got[1]}"
            s = summary[n]
            s["correct"] += got[0]
            s["trials"] += got[1]
            if n != "fp16":
                s["cells"] += 1
                ok = abs(got[0] - ref) <= tolerance
                s["cells_within"] += ok
                row[f"{n} within {tolerance}"] = "yes" if ok else f"NO ({got[0] - ref:+d})"
        rows.append(row)
    return rows, summary


def run_methods(args, run_dir: str) -> None:
    """One ``kvquant_hf.evaluation.passkey`` process per method, all at once; their logs next to the JSON."""
    procs = []
    for method in args.methods:
        cmd = [sys.executable, "-m", "kvquant_hf.evaluation.passkey", "--model", args.model, "--lengths",
               *map(str, args.lengths), "--depths", *map(str, args.depths), "--trials", str(args.trials),
               "--methods", method, "--json", os.path.join(run_dir, f"{method}.json"), "--dtype", args.dtype]
        if args.signposts:
            cmd += ["--signposts", args.signposts]
        if args.device:
            cmd += ["--device", args.device]
        log = open(os.path.join(run_dir, f"{method}.log"), "w")  # noqa: SIM115 -- closed after the process ends
        procs.append((method, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    for method, proc, log in procs:
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            print(f"{method}: stopped after {args.timeout} s (its finished cells are kept)", flush=True)
        log.close()


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", nargs="+", default=["fp16", "nuq4", "nuq3", "kivi2"])
    ap.add_argument("--signposts", default=None, help="folder with nuqX subfolders written by calibrate.py")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--depths", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--timeout", type=float, default=540.0, help="seconds per method process")
    ap.add_argument("--run-dir", default=None, help="where the per-method JSON go (default: a temporary folder)")
    ap.add_argument("--merge-only", metavar="DIR", default=None, help="merge the per-method JSON of DIR")
    ap.add_argument("--tolerance", type=int, default=1)
    ap.add_argument("--order", nargs="*", default=None, help="run names (file stems) in column order, fp16 first")
    args = ap.parse_args(argv)
    tmp = None
    folder = args.merge_only
    if folder is None:
        if args.run_dir is None:
            tmp = tempfile.TemporaryDirectory()
        folder = args.run_dir or tmp.name
        os.makedirs(folder, exist_ok=True)
        run_methods(args, folder)
    runs = load(folder)
    if tmp is not None:
        tmp.cleanup()
    if args.order:
        missing = [n for n in args.order if n not in runs]
        if missing:
            raise SystemExit(f"--order names runs that are not in {folder}: {missing}")
        runs = {n: runs[n] for n in args.order + [n for n in runs if n not in args.order]}
    rows, summary = build(runs, args.tolerance)
    totals = [{"kind": "total", "run": n, **summary[n], "complete": runs[n]["complete"]} for n in summary]
    write_result(NAME, [{"kind": "cell", **r} for r in rows] + totals, render(runs, rows, summary, args.tolerance),
                 meta={"configs": {n: runs[n]["config"] for n in summary}, "tolerance": args.tolerance},
                 device=args.device)
    return rows


def render(runs: dict[str, dict], rows: list[dict], summary: dict, tolerance: int) -> str:
    names = ["fp16"] + [n for n in runs if n != "fp16"]
    cols = ["length", "depth"] + names + [f"{n} within {tolerance}" for n in names if n != "fp16"]
    cfg0 = runs["fp16"]["config"]
    lines = ["# Passkey retrieval", "",
             f"Model `{cfg0.get('model')}`, real `KVQuantCache` with chunked prefill; correct / trials per (prompt "
             f"length, depth of the key); a method is within tolerance in a cell when its count is at most "
             f"{tolerance} from fp16's.", "", md_table(rows, cols), "", "## Totals", ""]
    for n in names:
        s = summary[n]
        extra = "" if n == "fp16" else f"; cells within {tolerance} of fp16: {s['cells_within']}/{s['cells']}"
        cfg = runs[n]["config"]
        lines.append(f"- **{n}** (`--methods {runs[n]['method']}`, signposts `{cfg.get('signposts')}`, "
                     f"{'complete' if runs[n]['complete'] else 'incomplete'}): {s['correct']}/{s['trials']}{extra}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
