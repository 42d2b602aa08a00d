"""What every benchmark shares: model shapes with random weights, timing, and the result files.

Each benchmark calls :func:`write_result` once per run (or after every row, so an interrupted run still leaves
its rows): it writes ``benchmarks/results/<name>.md`` and ``<name>.json`` (the latest run: command, device, git
commit, date, library versions and the rows) and appends the rows to ``benchmarks/results/history.csv`` (one line
per row: name, date, commit, device, the row as JSON). When ``$OUT`` is set (the GPU machine), the three files are
copied there too so they come back with the run.
"""

from __future__ import annotations

import csv
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys

import torch

#: where the result files live (tests point it at a temporary folder)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HISTORY_FILE = "history.csv"
HISTORY_COLUMNS = ("name", "date", "commit", "device", "row")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    # a tiny shape for the CPU smoke runs of the GPU benchmarks (random weights, head_dim 32)
    "tiny": dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=1 << 20,
    ),
}


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


def time_ms(fn, warmup: int = 2, iters: int = 5, device: str | torch.device = "cuda") -> float:
    """Median time of ``fn()`` in ms: CUDA events on a GPU, wall time on the CPU."""
    from kvquant_hf.benchmarking import median_ms

    return median_ms(fn, warmup, iters, device)


def release_memory(device: str | torch.device) -> None:
    """Collect garbage and give cached CUDA blocks back, so the next allocation sees the real free memory."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: str | torch.device) -> None:
    """Wait for every GPU (a model spread with ``device_map`` runs on several); nothing to do on the CPU."""
    if torch.device(device).type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), GB/s."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------
# result files
# --------------------------------------------------------------------------------------------
def git_commit() -> str:
    """The checkout's commit (``-dirty`` when files differ from it); ``$BENCHMARK_COMMIT`` where the copy of the
    tree has no git metadata (the GPU machine); else ``unknown``."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=_ROOT,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("BENCHMARK_COMMIT", "unknown")


def device_name(device: str | torch.device | None = None) -> str:
    """The GPU's name for CUDA runs, else ``cpu (<processor>, N threads)``."""
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        n = torch.cuda.device_count()
        name = torch.cuda.get_device_name(dev if dev is not None and dev.index is not None else 0)
        return name if n == 1 else f"{n} x {name}"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line() -> str:
    """How this run was started, as one could type it again from the repository root."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.startswith("benchmarks."):
        return " ".join(["python", "-m", spec.name] + sys.argv[1:])
    return " ".join(["python"] + sys.argv)


def environment(device: str | torch.device | None = None) -> dict:
    """Command, device, commit, date and library versions of this run."""
    import transformers

    env = {
        "command": command_line(),
        "device": device_name(device),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:  # CPU-only installs
        pass
    return env


def results_dir() -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    return RESULTS_DIR


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None  # NaN: JSON has none
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_result(name: str, rows: list[dict], markdown: str, meta: dict | None = None,
                 device: str | torch.device | None = None, history: bool = True) -> str:
    """Write ``<name>.json`` and ``<name>.md`` (this run) and append ``rows`` to ``history.csv``; returns the
    markdown path. ``meta``: settings of the run recorded next to the environment. ``history=False`` rewrites
    the pair only (a benchmark that saves after every row appends its rows once, at the end)."""
    out = results_dir()
    env = environment(device)
    rows = _jsonable(rows)
    data = {"name": name, **env, "meta": _jsonable(meta or {}), "rows": rows}
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    run = "\n".join(f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in env.items())
    md_path = os.path.join(out, f"{name}.md")
    with open(md_path, "w") as fh:
        fh.write(markdown.rstrip() + "\n\n## Run\n" + run + "\n")
    files = [f"{name}.json", f"{name}.md"]
    if history:
        append_history(name, rows, env)
        files.append(HISTORY_FILE)
    dest = os.environ.get("OUT")
    if dest and os.path.abspath(dest) != os.path.abspath(out):
        os.makedirs(dest, exist_ok=True)
        for f in files:
            shutil.copy(os.path.join(out, f), os.path.join(dest, f))
    return md_path


def append_history(name: str, rows: list[dict], env: dict) -> None:
    """One line per row in ``history.csv`` (header written when the file is new)."""
    path = os.path.join(results_dir(), HISTORY_FILE)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(HISTORY_COLUMNS)
        for row in rows:
            w.writerow([name, env["date"], env["commit"], env["device"], json.dumps(row, sort_keys=True)])


def read_result(name: str) -> dict:
    """The latest run of benchmark ``name`` (its ``.json``)."""
    with open(os.path.join(results_dir(), f"{name}.json")) as fh:
        return json.load(fh)


def md_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
