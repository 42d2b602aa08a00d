"""Shared setup for the GPU benchmarks: model shapes with random weights, timing, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import torch

#: Published shapes; weights are random (speed/memory only, never accuracy).
SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "llama2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    "mistral-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
        max_position_embeddings=32768, sliding_window=None,
    ),
}


#: A tiny shape for CPU smoke tests of the GPU scripts (random weights, head_dim 32).
SHAPES["tiny"] = dict(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=1 << 20,
)


def make_config(shape: str, num_layers: int | None = None):
    """A transformers config of a published shape (optionally fewer layers)."""
    from transformers import LlamaConfig, MistralConfig

    kwargs = dict(SHAPES[shape])
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    cls = MistralConfig if shape.startswith("mistral") else LlamaConfig
    rope = dict(kwargs.pop("rope_scaling", None) or {"rope_type": "default"})
    rope["rope_theta"] = kwargs.pop("rope_theta")
    return cls(**kwargs, rope_parameters=rope)  # transformers 5.x names RoPE settings `rope_parameters`


def random_model(shape: str, dtype=torch.bfloat16, device="cuda", num_layers: int | None = None,
                 attn_implementation: str = "sdpa"):
    """A causal LM of ``shape`` with random weights, built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    cfg = make_config(shape, num_layers)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def random_model_device_map(shape: str, devices: list[str], dtype=torch.bfloat16, num_layers: int | None = None,
                            attn_implementation: str = "sdpa"):
    """A causal LM of ``shape`` with random weights spread over ``devices`` with accelerate (``device_map``).

    Built on the meta device, then each module is materialized directly on its device (no CPU copy of the
    weights): embedding (and rotary embedding) on the first device, decoder layers split evenly in order,
    final norm and LM head on the last. Returns ``(model, device_map)``; accelerate's hooks move activations
    between devices.
    """
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    cfg = make_config(shape, num_layers)
    cfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    n = cfg.num_hidden_layers
    dmap = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0], "model.norm": devices[-1],
            "lm_head": devices[-1]}
    for i in range(n):
        dmap[f"model.layers.{i}"] = devices[i * len(devices) // n]
    for name, dev in dmap.items():
        model.get_submodule(name).to_empty(device=dev)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    rot = model.model.rotary_emb  # its inv_freq buffer is computed at construction: rebuild it on its device
    with torch.device(devices[0]):
        model.model.rotary_emb = type(rot)(config=cfg)
    model.eval()
    if len(set(dmap.values())) > 1:
        skip = set(getattr(model, "_skip_keys_device_placement", None) or []) | {"cache", "past_key_values"}
        model = dispatch_model(model, device_map=dmap, skip_keys=sorted(skip))
    return model, dmap


def cuda_time_ms(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of ``fn()`` in ms measured with CUDA events (one event pair per call)."""
    from kvquant_hf.benchmarking import cuda_median_ms

    return cuda_median_ms(fn, warmup, iters)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), GB/s."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def environment() -> dict:
    """Device and library versions for result files."""
    import transformers
    import triton

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def results_dir() -> str:
    """$OUT on the device machine, else benchmarks/results/."""
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    return out


def write_results(name: str, rows: list[dict], markdown: str, meta: dict | None = None,
                  repo_and_out: bool = False) -> str:
    """Write ``name.json`` (rows + environment) and ``name.md``; returns the markdown path.

    ``repo_and_out``: write to ``benchmarks/results/`` and, when ``$OUT`` is set, copy both files there too.
    """
    if repo_and_out:
        out_env = os.environ.pop("OUT", None)
        try:
            path = write_results(name, rows, markdown, meta)
        finally:
            if out_env is not None:
                os.environ["OUT"] = out_env
        if out_env:
            import shutil

            os.makedirs(out_env, exist_ok=True)
            for ext in ("json", "md"):
                shutil.copy(os.path.join(os.path.dirname(path), f"{name}.{ext}"), os.path.join(out_env, f"{name}.{ext}"))
        return path
    out = results_dir()
    env = environment()
    if meta:
        env.update(meta)
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump({"environment": env, "rows": rows}, fh, indent=2)
    header = "\n".join(f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in env.items())
    path = os.path.join(out, f"{name}.md")
    with open(path, "w") as fh:
        fh.write(markdown.rstrip() + "\n\n## Environment\n" + header + "\n")
    return path


def md_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
