"""Throughput of ``model.generate`` at the largest batch that fits one GPU (Llama-3-8B shape, random bf16 weights).

Per context (``--contexts``, default 32K and 128K) and method, the largest batch whose generate fits is found,
then one ``generate(max_new_tokens=--new-tokens)`` call on random prompts of that length is timed:

* methods: ``kvquant_nuq4`` / ``kvquant_nuq2`` (``cache_implementation="kvquant"`` with the default cache config
  apart from the bits: 1% outliers, NormalFloat tables, as an uncalibrated cache; random weights, so the tables
  change nothing in the speed), ``dynamic`` (``DynamicCache`` + SDPA), ``static_compile`` (``StaticCache`` with
  transformers' automatic ``torch.compile`` of the decode step, its own fast path) and ``quanto_int4``
  (``QuantizedCache``, optimum-quanto int4; skipped with a note where optimum-quanto is not installed).
  Optional: ``kvquant_nuq4_graph`` / ``kvquant_nuq2_graph`` (``cuda_graph=True``);
* **largest batch**: for kvquant, the largest batch whose ``kvquant_hf.plan_capacity`` plan holds context + new
  tokens per sequence; for the fp caches the same planner with ``"fp16"`` (bf16 K/V, the whole prompt in one
  prefill). A run that still runs out of memory is retried at 3/4 of the batch (memory released in between) and
  the batches tried are noted. ``--batches`` overrides the search (one value, or one per context);
* **prefill and decode apart**: a streamer records when each token leaves ``generate``. ``prefill_s`` = time from
  the call to the first new token (what ``generate(max_new_tokens=1)`` takes); ``decode_tok_s`` = batch x
  (n - 1) / (time of token n - time of token 1), i.e. ``batch * (n-1) / (time(n) - time(1))`` measured inside one
  call (no difference of two long prefills). Median over ``--repeats`` calls;
* ``decode_ratio``: decode tokens/s over the best fp16 cache's (``dynamic``, ``static_compile``) at that context.

Each case starts with a short warm-up ``generate`` at the same batch (kernel compilation; for ``static_compile``
the compile of the decode step, on the same ``StaticCache``, reset before the timed call). A case whose estimated
time (prefill scaled from the same method's previous case, else the previous case of any method) exceeds the time
left (``--time-budget``) is skipped and reported. Long contexts at the largest batch take minutes per call: run
the contexts in separate commands.

Usage::

    PYTHONPATH=. python -m benchmarks.throughput --contexts 32768          # about 6 minutes on one H100
    PYTHONPATH=. python -m benchmarks.throughput --contexts 131072 --time-budget 560
    python -m benchmarks.throughput --smoke      # tiny model on CPU, a few seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings

import torch

import kvquant_hf
from benchmarks.common import md_table, random_model, release_memory, synchronize, write_result
from kvquant_hf.generation import cache_kwarg_name

NAME = "throughput"
FP16_METHODS = ("dynamic", "static_compile")
BASELINES = FP16_METHODS + ("quanto_int4",)
DEFAULT_METHODS = ["kvquant_nuq4", "kvquant_nuq2", "dynamic", "static_compile", "quanto_int4"]
MAX_BATCH = 1024
WARMUP_PROMPT = 256


class TokenClock:
    """A ``generate`` streamer that records when each new token comes out (the prompt's put is ignored)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.dim() >= 2 and value.shape[-1] > 1:  # the prompt
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def cache_config(method: str) -> dict:
    """The ``cache_config`` of a kvquant method: the defaults with the method's bits (and CUDA graphs)."""
    cfg = {"bits": int(method.split("_")[1][3:])}
    if method.endswith("_graph"):
        cfg["cuda_graph"] = True
    return cfg


def planned_batch(model, method: str, context: int, new_tokens: int, free_memory: int | None = None) -> int:
    """Largest batch whose ``plan_capacity`` plan holds ``context + new_tokens`` per sequence (0: none).
    ``free_memory``: bytes free on the model's device (None: queried from CUDA)."""
    plan_cfg = cache_config(method) if method.startswith("kvquant") else "fp16"

    def fits(batch: int) -> bool:
        plan = kvquant_hf.plan_capacity(model, plan_cfg, batch_size=batch, prompt_tokens=context,
                                        free_memory=free_memory)
        return plan.max_tokens >= context + new_tokens

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_BATCH and fits(hi):
        lo, hi = hi, hi * 2
    if hi > MAX_BATCH:
        return lo
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def generate_kwargs(model, method: str, batch: int, context: int, new_tokens: int) -> tuple[dict, object]:
    """``generate`` keywords of ``method`` (and the ``StaticCache`` it reuses, else None)."""
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    if method.startswith("kvquant"):
        kwargs.update(cache_implementation="kvquant", cache_config=cache_config(method))
        return kwargs, None
    if method == "dynamic":
        return kwargs, None
    if method == "quanto_int4":
        kwargs.update(cache_implementation="quantized", cache_config={"backend": "quanto", "nbits": 4})
        return kwargs, None
    if method == "static_compile":
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=context + new_tokens)
        kwargs[cache_kwarg_name(model)] = cache
        return kwargs, cache
    raise ValueError(f"unknown method {method!r}; choose from {DEFAULT_METHODS} or kvquant_nuqN_graph")


def timed_generate(model, ids: torch.Tensor, kwargs: dict, device: str) -> tuple[float, float]:
    """One ``generate``: (seconds to the first new token, seconds from the first to the last new token)."""
    clock = TokenClock()
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), streamer=clock, **kwargs)
    synchronize(device)
    if len(clock.times) < 2:
        raise RuntimeError(f"generate produced {len(clock.times)} new tokens; need at least 2")
    return clock.times[0] - t0, clock.times[-1] - clock.times[0]


def measure(model, method: str, batch: int, context: int, new_tokens: int, repeats: int, device: str) -> dict:
    """Warm up, then time ``repeats`` generate calls of ``method`` at ``batch`` x ``context``."""
    first = next(model.parameters()).device
    if method.startswith("kvquant"):
        kvquant_hf.patch_model(model)
    else:
        kvquant_hf.unpatch_model(model)  # the baselines run the stock attention (dynamo traces it)
    kwargs, static = generate_kwargs(model, method, batch, context, new_tokens)
    warm = torch.randint(0, model.config.vocab_size, (batch, min(context, WARMUP_PROMPT)), device=first)
    timed_generate(model, warm, {**kwargs, "max_new_tokens": 3, "min_new_tokens": 3}, device)
    del warm
    prefill, decode = [], []
    for _ in range(repeats):
        if static is not None:
            with torch.inference_mode():  # its tensors were made under inference mode
                static.reset()
        release_memory(device)
        ids = torch.randint(0, model.config.vocab_size, (batch, context), device=first)
        p, d = timed_generate(model, ids, kwargs, device)
        del ids
        prefill.append(p)
        decode.append(d)
    d = statistics.median(decode)
    return {"prefill_s": statistics.median(prefill), "decode_s": d, "decode_tok_s": batch * (new_tokens - 1) / d,
            "ms_per_step": 1e3 * d / (new_tokens - 1)}


def run_case(model, method: str, context: int, batch: int, args, device: str) -> dict:
    """Measure ``method`` at ``batch``; on out-of-memory retry at 3/4 of the batch until it runs or reaches 0."""
    row = {"method": method, "context": context, "batch": batch}
    tried = []
    static = method == "static_compile"
    while batch > 0:
        tried.append(batch)
        release_memory(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        try:
            row.update(measure(model, method, batch, context, args.new_tokens, args.repeats, device))
            row["batch"] = batch
            if device.startswith("cuda"):
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            break
        except (torch.OutOfMemoryError, kvquant_hf.CapacityError) as exc:
            row["error"] = f"OOM at batch {batch}: {str(exc).splitlines()[0][:80]}"
            batch = min(batch - 1, batch * 3 // 4)
        except Exception as exc:  # noqa: BLE001 -- one method failing must not hide the others; the error is reported
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            break
        finally:
            if static:
                torch._dynamo.reset()
            release_memory(device)
    else:
        row["batch"] = 0
    if "decode_tok_s" in row:
        row.pop("error", None)
    if len(tried) > 1:
        row["note"] = "batches tried: " + ", ".join(map(str, tried))
    return row


def add_ratios(rows: list[dict]) -> None:
    """``decode_ratio``: each row's decode tokens/s over the best fp16 cache's at its context."""
    for row in rows:
        best = max((r["decode_tok_s"] for r in rows if r["context"] == row["context"]
                    and r["method"] in FP16_METHODS and "decode_tok_s" in r), default=None)
        if best and "decode_tok_s" in row:
            row["decode_ratio"] = row["decode_tok_s"] / best
        else:
            row.pop("decode_ratio", None)


def batch_for(args, index: int, model, method: str, context: int, device: str) -> int:
    if args.batches:
        return args.batches[index] if len(args.batches) > 1 else args.batches[0]
    if not device.startswith("cuda"):
        return 1  # the planner needs a device whose free memory it can query
    return planned_batch(model, method, context, args.new_tokens)


def estimate_s(done: dict, method: str, batch: int, context: int, args) -> float | None:
    """Seconds a case should take (prefill quadratic in the context, linear in the batch), from the same
    method's last measured case, else the last case of any method; None when nothing was measured yet."""
    if not done:
        return None
    ctx, b, prefill_s, decode_s = done.get(method) or done[next(reversed(done))]
    per_call = prefill_s * (batch / b) * (context / ctx) ** 2 + decode_s * (batch / b) * (context / ctx)
    return per_call * (args.repeats + 1)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="batch per context (one value: every context) instead of the largest that fits")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per generate call (at least 2)")
    ap.add_argument("--repeats", type=int, default=1, choices=[1, 2, 3], help="timed generate calls per case")
    ap.add_argument("--time-budget", type=float, default=330.0, help="seconds; cases estimated past it are skipped")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, kvquant_nuq4 and dynamic")
    args = ap.parse_args(argv)
    device = args.device
    if args.smoke:
        device, args.shape, args.dtype, args.layers = "cpu", "tiny", "float32", 2
        args.contexts, args.batches, args.methods, args.new_tokens = [64], [2], ["kvquant_nuq4", "dynamic"], 4
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode is timed between the first and the last new token)")
    if args.batches and len(args.batches) not in (1, len(args.contexts)):
        ap.error("--batches takes one value or one per context")
    # random weights, no calibration: the NormalFloat tables are what an uncalibrated cache uses
    warnings.filterwarnings("ignore", category=kvquant_hf.UncalibratedCacheWarning)
    start = time.time()
    model = random_model(args.shape, num_layers=args.layers, dtype=getattr(torch, args.dtype), device=device)
    meta = {k: v for k, v in vars(args).items() if k not in ("smoke", "device")}
    meta["layers"] = model.config.num_hidden_layers
    rows: list[dict] = []
    done: dict[str, tuple] = {}

    def save(history: bool = False):
        add_ratios(rows)
        write_result(NAME, rows, render(rows, meta), meta=meta, device=device, history=history)

    have_quanto = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto")
    for i, context in enumerate(args.contexts):
        for method in args.methods:
            row = {"method": method, "context": context}
            left = args.time_budget - (time.time() - start)
            if method == "quanto_int4" and not have_quanto:
                row["note"] = "skipped: optimum-quanto is not installed"
            elif left <= 0:
                row["note"] = "skipped: time budget spent"
            else:
                batch = batch_for(args, i, model, method, context, device)
                est = estimate_s(done, method, batch, context, args)
                if batch == 0:
                    row.update(batch=0, error="the planner finds no room for one sequence")
                elif est is not None and est > left:
                    row.update(batch=batch, note=f"skipped: estimated {est:.0f} s > {left:.0f} s left")
                else:
                    row = run_case(model, method, context, batch, args, device)
                    if "decode_tok_s" in row:
                        done.pop(method, None)  # the latest case last
                        done[method] = (context, row["batch"], row["prefill_s"], row["decode_s"])
            print(row, flush=True)
            rows.append(row)
            save()
    save(history=True)
    return rows


def render(rows: list[dict], meta: dict) -> str:
    cols = ["method", "context", "batch", "prefill_s", "decode_tok_s", "decode_ratio", "ms_per_step", "peak_gib",
            "error", "note"]
    return (f"# Throughput of `generate` at the largest batch that fits: {meta['shape']}, random {meta['dtype']} "
            f"weights, {meta['new_tokens']} new tokens\n\n"
            "prefill_s: seconds from the call to the first new token; decode_tok_s: batch x (new tokens - 1) / "
            "seconds from the first to the last new token; decode_ratio: over the best fp16 cache (dynamic, "
            "static_compile) at that context; ms_per_step: one decode step of the whole batch. Batch: the largest "
            "whose `plan_capacity` plan fits (fp caches: the planner's fp16 mode), lowered on out-of-memory.\n\n"
            + md_table(rows, cols))


if __name__ == "__main__":
    main()
