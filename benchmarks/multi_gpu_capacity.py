"""Capacity over several GPUs: a Llama-3-8B-shaped model (random bf16 weights) spread over every visible GPU with
accelerate (``device_map``), its nuq2-1% ``KVQuantCache`` filled to the planner's capacity.

Each layer's packed cache lives on its layer's GPU and the Triton kernels run there. The planner counts each
device (its layers, its share of the weights) and the context is the minimum over the devices. Steps:

1. ``plan_capacity`` from each GPU's free memory (per-device prediction and the overall one);
2. measured maximum: bisection on "allocates and decodes one step" (out-of-memory = does not fit) within
   ``--search-span`` of the prediction (``--search-steps 0`` skips it);
3. fast fill at that size (or ``--scale`` x the prediction), ``--decode-steps`` timed steps (wall time between
   synchronizations of every GPU), each GPU's memory.

Results: ``benchmarks/results/multi_gpu_capacity.{md,json}`` (copied to ``$OUT`` when set).

Usage (2 x H200, < 8 min)::

    PYTHONPATH=. python benchmarks/multi_gpu_capacity.py                # nuq2-1%, full capacity
    PYTHONPATH=. python benchmarks/multi_gpu_capacity.py --scale 0.25   # a quarter of it (faster)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import capacity
from common import md_table, random_model_device_map, write_results

import kvquant_hf


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--devices", nargs="*", default=None, help="default: every visible GPU (cpu for smoke tests)")
    ap.add_argument("--methods", nargs="+", default=["nuq2"])
    ap.add_argument("--decode-steps", type=int, default=5)
    ap.add_argument("--search-steps", type=int, default=5)
    ap.add_argument("--search-span", type=float, default=0.05)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the predicted capacity to fill")
    ap.add_argument("--free-mib", type=float, default=64.0, help="CPU only: memory figure for the planner")
    ap.add_argument("--headroom-mib", type=float, default=512.0)
    ap.add_argument("--time-budget", type=float, default=420.0)
    ap.add_argument("--name", default="multi_gpu_capacity")
    args = ap.parse_args(argv)
    devices = args.devices or ([f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"])
    device = devices[0]
    model, dmap = random_model_device_map(args.shape, devices, dtype=getattr(torch, args.dtype),
                                          num_layers=args.layers)
    kvquant_hf.patch_model(model)
    budget = capacity.Budget(args.time_budget)
    rows = []
    meta = {"shape": args.shape, "layers": model.config.num_hidden_layers, "dtype": args.dtype,
            "devices": devices, "layers_per_device": {d: sum(1 for k, v in dmap.items()
                                                                 if k.startswith("model.layers.") and v == d)
                                                      for d in devices}}
    for method in args.methods:
        try:
            row = capacity.capacity_row(model, method, args, device, budget)
        except torch.OutOfMemoryError as exc:
            row = {"section": "capacity", "method": method, "error": f"OOM: {str(exc).splitlines()[0][:100]}"}
        print(row, flush=True)
        rows.append(row)
    md = [f"# Capacity over {len(devices)} device(s): {args.shape}, random {args.dtype} weights, device_map\n",
          (f"Layers per device: {meta['layers_per_device']}. Predicted = `plan_capacity` (decode scenario) from "
          "each device's free memory, the minimum over devices; measured = bisection on allocate + one decode "
          "step (out-of-memory = does not fit); then fast fill at that size and timed decode steps (wall time "
          "between synchronizations of every GPU).\n"),
          md_table(rows, ["method", "free_gib", "predicted_per_device", "predicted_tokens", "measured_tokens",
                          "predicted_vs_measured", "context", "cache_gib", "decode_ms", "fill_s", "error"])]
    for r in rows:
        if isinstance(r.get("gpu_memory"), dict):
            md.append(f"\n- {r['method']} at {r['context']:,} tokens, decode steps (ms) {r['decode_ms_all']}: " +
                      "; ".join(f"{d}: allocated {m['allocated_gib']:.2f} GiB, peak {m['peak_allocated_gib']:.2f}, "
                                f"driver used {m['driver_used_gib']:.2f} of {m['total_gib']:.2f}"
                                for d, m in r["gpu_memory"].items()))
    write_results(args.name, rows, "\n".join(md), meta, repo_and_out=True)
    return rows


if __name__ == "__main__":
    main()
