"""Planner predictions (no GPU needed) for the long-context cases of the issues: Llama-3-8B (bf16, GQA 8 KV heads) on
1 and 2 H200s, Llama-2-7B (fp16, 32 KV heads) on 1, 2 and 8 H200s; nuq4/nuq3/nuq2 with 1% outliers and an fp16
``DynamicCache``. Each GPU is taken as 139.8 GiB free before the weights (an H200 as PyTorch reports it); layers are
split evenly in order, as accelerate's ``device_map="auto"`` does for equal GPUs.

Usage: ``python benchmarks/plan_table.py`` (writes ``benchmarks/results/plan_table.md``)
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kvquant_hf

GiB = 2**30
SHAPES = {
    "Llama-3-8B (bf16)": (LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8), torch.bfloat16, (1, 2)),
    "Llama-2-7B (fp16)": (LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32), torch.float16, (1, 2, 8)),
}


def main() -> None:
    rows = ["| model | GPUs | method | bytes per token (all layers) | predicted max tokens | limiting device |",
            "|---|---|---|---|---|---|"]
    for name, (cfg, dtype, counts) in SHAPES.items():
        for n in counts:
            devs = [f"cuda:{i}" for i in range(n)]
            dm = [devs[i * n // cfg.num_hidden_layers] for i in range(cfg.num_hidden_layers)]
            for method in ("fp16", "nuq4", "nuq3", "nuq2"):
                cc = "fp16" if method == "fp16" else {"bits": int(method[3:]), "outlier_fraction": 0.01}
                p = kvquant_hf.plan_capacity(None, cc, model_config=cfg, dtype=dtype, device_map=dm,
                                             free_memory={d: int(139.8 * GiB) for d in devs}, prompt_tokens=1)
                bpt = sum(d.bytes_per_token for d in p.devices)
                rows.append(f"| {name} | {n} | {method if method == 'fp16' else method + '-1%'} | {bpt:,} | "
                            f"{p.max_tokens:,} | {p.limiting_device} |")
    md = "# Planner predictions (decode scenario: the cache filled, then one token per step)\n\n" + __doc__.split(
        "\n\n")[0] + "\n\n" + "\n".join(rows) + "\n\nCommand: `python benchmarks/plan_table.py`\n"
    out = os.path.join(os.path.dirname(__file__), "results", "plan_table.md")
    with open(out, "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
