"""Merge per-method passkey JSON files (``python -m kvquant_hf.evaluation.passkey --json``, e.g. from
``benchmarks/run_passkey_gpu.sh``) into one table against fp16: per cell correct/trials and whether each method
is within ``--tolerance`` trials of fp16 (the issue's "match fp16 within one trial per cell").

Usage: ``python benchmarks/passkey_table.py DIR [--name passkey_smollm2] [--label nuq3-optu=...]``
writes ``benchmarks/results/NAME.{md,json}``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import md_table, results_dir


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--name", default="passkey_smollm2")
    ap.add_argument("--tolerance", type=int, default=1)
    ap.add_argument("--title", default="Passkey retrieval")
    ap.add_argument("--notes", default="", help="markdown placed under the title (@FILE: read it from FILE)")
    ap.add_argument("--order", nargs="*", default=None, help="run names (file stems) in column order, fp16 first")
    args = ap.parse_args(argv)
    runs = load(args.folder)
    if args.order:
        missing = [n for n in args.order if n not in runs]
        if missing:
            raise SystemExit(f"--order names runs that are not in {args.folder}: {missing}")
        runs = {n: runs[n] for n in args.order + [n for n in runs if n not in args.order]}
    if args.notes.startswith("@"):
        with open(args.notes[1:]) as fh:
            args.notes = fh.read().strip()
    rows, summary = build(runs, args.tolerance)
    names = ["fp16"] + [n for n in runs if n != "fp16"]
    cols = ["length", "depth"] + names + [f"{n} within {args.tolerance}" for n in names if n != "fp16"]
    lines = [f"# {args.title}", "", args.notes, "", md_table(rows, cols), "", "## Totals", ""]
    for n in names:
        s = summary[n]
        extra = "" if n == "fp16" else f"; cells within {args.tolerance} of fp16: {s['cells_within']}/{s['cells']}"
        cfg = runs[n]["config"]
        lines.append(f"- **{n}** (`--methods {runs[n]['method']}`, signposts `{cfg.get('signposts')}`, "
                     f"{'complete' if runs[n]['complete'] else 'INCOMPLETE'}): {s['correct']}/{s['trials']}{extra}")
    md = "\n".join(lines) + "\n"
    out = results_dir()
    with open(os.path.join(out, f"{args.name}.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(out, f"{args.name}.json"), "w") as fh:
        json.dump({"rows": rows, "summary": summary,
                   "configs": {n: runs[n]["config"] for n in names}}, fh, indent=1)
    print(md)


if __name__ == "__main__":
    main()
