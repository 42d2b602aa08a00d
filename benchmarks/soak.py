"""Soak test: thousands of decode steps through one KVQuantCache, checked against references along the way.

A prompt is prefilled, then ``--steps`` tokens (a fixed random token stream, teacher-forced, so every reference
sees the same sequence) are decoded one at a time. Every ``--check-every`` steps a checkpoint records:

* **vs fp** -- the step's logits against the exact model (a full forward over the whole sequence, no cache):
  relative max error and top-1 agreement. This is quantization error; the soak asks whether it *grows* with the
  number of steps (first vs last checkpoint).
* **vs torch** (GPU, Triton backend) -- the same step recomputed with every layer switched to the torch reference
  path over the same packed storage: relative max logit difference, top-1 agreement, and whether the token the
  Triton kernel quantized is bit-identical to the one ``quant.py`` writes.
* **memory** -- ``cache.get_memory_footprint(include_spare=True)`` (the cache's own accounting) against the bytes
  of the tensors it actually holds, and the allocator's growth since before the cache existed
  (``torch.cuda.memory_allocated`` on GPU, process RSS on CPU): ``unaccounted`` = allocator growth - tensor bytes
  should stay flat; and, exactly, the bytes of every tensor storage alive in the process (found through the garbage
  collector) minus the cache's tensor bytes, which must not change at all between checkpoints (no leak).

* **kernels** (``--kernel-check``; on CPU through the Triton interpreter) -- the Triton attention of a probe query
  over each layer's whole live history against the torch reference, and the Triton quantize kernels re-encoding the
  token stored last (from its captured pre-RoPE K/V) against what the cache holds, bit for bit.

GPU mode also starts with an edge-value check of the Triton quantize kernels (all equal, all zero, -0.0,
+-65504, tiny, huge fp32; fp16/bf16/fp32) against ``quant.py``, bit for bit, since the CPU interpreter cannot check
bf16 rounding.

Usage (GPU default: about 2 minutes on one H100, at most ``--max-seconds`` of decode steps)::

    PYTHONPATH=. python -m benchmarks.soak                                       # 8B-shaped, 4 layers, random bf16
    python -m benchmarks.soak --device cpu --steps 2000 --kernel-check           # tiny random Llama
    python -m benchmarks.soak --device cpu --steps 2000 --model smollm2          # the embedded SmolLM2
    python -m benchmarks.soak --smoke                                            # a few steps on CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from benchmarks.common import md_table, random_model, write_result
from kvquant_hf.generation import cache_kwarg_name

NAME = "soak"


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def tiny_model(seed: int = 0, layers: int = 2):
    """A small random Llama with a realistic head_dim (64): hidden 256, 4 query / 2 kv heads, vocab 512."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=65536,
                      rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def load_model(args):
    if args.model == "smollm2":
        from kvquant_hf.models.loading import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer("smollm2", dtype=getattr(torch, args.dtype), device=args.device)
        return model.eval()
    if args.model == "tiny":
        return tiny_model(args.seed, args.layers or 2).to(args.device, getattr(torch, args.dtype))
    return random_model(args.model, dtype=getattr(torch, args.dtype), device=args.device, num_layers=args.layers)


# --------------------------------------------------------------------------------------------
# GPU: edge values through the Triton quantize kernels
# --------------------------------------------------------------------------------------------
def edge_kernel_check(device: str) -> list[dict]:
    from kvquant_hf import quant
    from kvquant_hf.kernels import quantize_keys_triton, quantize_values_triton

    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 7, 128)
    base = torch.randn(shape, generator=g)
    edges = {
        "all_equal": torch.full(shape, 3.25), "all_zero": torch.zeros(shape), "neg_zero": torch.full(shape, -0.0),
        "fp16_max": (base * 30000).clamp(-65504, 65504).index_fill(-1, torch.tensor([0, 2]), 65504.0)
        .index_fill(-1, torch.tensor([1]), -65504.0),
        "tiny": base * 1e-6,
        "huge_fp32": (base * 1e6).index_fill(-1, torch.tensor([0]), 3e38).index_fill(-1, torch.tensor([1]), -3e38),
        "random": base,
    }
    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for name, x in edges.items():
            if name == "huge_fp32" and dtype != torch.float32:
                continue
            x = x.to(device, dtype)
            bad = []
            for bits in (2, 3, 4):
                lut = quant.normal_float_signposts(bits).to(device)
                lo, hi = quant.key_thresholds_from_sample(x.float(), 0.0)
                for n_slots, (l, h) in ((2, (lo, hi)), (1, (torch.full_like(lo, -0.5), torch.full_like(hi, 0.5)))):
                    got = quantize_keys_triton(x, lut, l, h, n_slots, bits)
                    ref = quant.quantize_keys(x, lut, l, h, n_slots, bits)
                    bad += [f"k{bits}:{f}" for f in ("codes", "out_val", "out_idx")
                            if not torch.equal(getattr(got, f), getattr(ref, f))]
                got = quantize_values_triton(x, lut, 2, bits)
                ref = quant.quantize_values(x, lut, 2, bits)
                bad += [f"v{bits}:{f}" for f in ("codes", "scale", "zero", "out_val", "out_idx")
                        if not torch.equal(getattr(got, f), getattr(ref, f))]
                if not (torch.isfinite(got.scale).all() and torch.isfinite(got.zero).all()):
                    bad.append(f"v{bits}:nonfinite scale")
            rows.append({"dtype": str(dtype).replace("torch.", ""), "edge": name,
                         "bit_identical": not bad, "mismatches": " ".join(bad) or "-"})
    return rows


# --------------------------------------------------------------------------------------------
# the soak
# --------------------------------------------------------------------------------------------
def _tensor_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in layer.batch_tensors():
            t = getattr(layer, name)
            total += t.numel() * t.element_size()
    return total


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in the process (model, cache, anything leaked)."""
    import gc

    gc.collect()  # garbage waiting for a collection (of this run or of earlier code in the process) is not live
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            key = (storage.device.type, storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _allocated(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return _rss()


def _step(model, kw, cache, tok, pos):
    return model(tok, position_ids=pos, use_cache=True, **{kw: cache}).logits[:, -1].float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


class _LastKV:
    """Keeps the last pre-RoPE keys/values ``[B, H, L, D]`` each layer's k_proj/v_proj produced."""

    def __init__(self, model):
        self.k, self.v, self.handles = {}, {}, []
        cfg = model.config.get_text_config()
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for i, layer in enumerate(model.model.layers):
            for name, store in (("k_proj", self.k), ("v_proj", self.v)):
                def hook(_m, _i, out, i=i, store=store):
                    store[i] = out.detach().view(out.shape[0], out.shape[1], -1, d).transpose(1, 2)
                self.handles.append(getattr(layer.self_attn, name).register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


def kernel_check(cache, last_k: dict, last_v: dict, model, seed: int) -> dict:
    """Triton kernels (interpreter on CPU, or the GPU) against the torch reference on the cache as it is now:
    the attention of a probe query over each layer's whole packed history + sink, and the re-quantization of the
    token stored last from its captured K/V (bit identity with what the cache holds)."""
    import kvquant_hf.kernels
    from kvquant_hf.attention import packed_attention_torch
    from kvquant_hf.layer_api import RopeContext, apply_rope

    g = torch.Generator().manual_seed(seed)
    rotary = model.model.rotary_emb
    cfg = model.config.get_text_config()
    worst, identical = 0.0, True
    for i, layer in enumerate(cache.layers):
        view = layer.packed_view()
        dev, d = layer.device, layer.head_dim
        q = torch.randn(layer.batch_size, cfg.num_attention_heads, 1, d, generator=g).to(dev)
        rope = RopeContext(None, None, rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))
        cos, sin = rope.cos_sin(layer.sink_positions[:, : layer.n_sink])
        ek = apply_rope(layer.sink_k[:, :, : layer.n_sink].float(), cos, sin)
        ev = layer.sink_v[:, :, : layer.n_sink].float()
        kw = dict(scaling=d**-0.5, inv_freq=rotary.inv_freq, attention_scaling=rope.attention_scaling)
        ref = packed_attention_torch(q, view, ek, ev, None, **kw)
        got = kvquant_hf.kernels.packed_attention_triton(q, view, ek.contiguous(), ev.contiguous(), None, **kw)
        worst = max(worst, _rel(got.float(), ref.float()))
        idx = layer.length - 1
        k, v = last_k[i][:, :, -1:], last_v[i][:, :, -1:]
        pk = kvquant_hf.kernels.quantize_keys_triton(k, layer.k_lut, layer.k_lower, layer.k_upper, layer.n_slots,
                                                 layer.config.key_bits)
        pv = kvquant_hf.kernels.quantize_values_triton(v, layer.v_lut, layer.n_slots, layer.config.value_bits)
        identical &= all(torch.equal(a, getattr(layer, n)[:, :, idx : idx + 1]) for a, n in (
            (pk.codes, "k_codes"), (pk.out_val, "k_out_val"), (pk.out_idx, "k_out_idx"), (pv.codes, "v_codes"),
            (pv.scale, "v_scale"), (pv.zero, "v_zero"), (pv.out_val, "v_out_val"), (pv.out_idx, "v_out_idx")))
    return {"kernel_attn_rel_diff": worst, "kernel_quantize_bit_identical": identical}


def soak(model, device: str, steps: int, prompt_len: int, check_every: int, cache_config: dict,
         max_seconds: float = float("inf"), seed: int = 0, log=print, cuda_graph: bool = False,
         kernels: bool = False) -> dict:
    """Run the soak on a (patched or not) model; returns ``{"rows": [...], "summary": {...}}``.

    With ``cuda_graph`` (CUDA + Triton) the steps between checkpoints are replayed from a CUDA graph
    (:class:`~kvquant_hf.cuda_graph.CUDAGraphDecoder`, re-captured after each checkpoint); checkpoints run eagerly.
    With ``kernels`` each checkpoint also runs :func:`kernel_check` (on CPU: the Triton interpreter).
    """
    import kvquant_hf

    kvquant_hf.patch_model(model)
    kw = cache_kwarg_name(model)
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prompt_len + steps + 1), generator=g).to(device)
    base_alloc = _allocated(device)
    base_live = _live_tensor_bytes()
    cache = kvquant_hf.KVQuantCache(cache_config, model_config=model.config)
    cache.reserve(prompt_len + steps + 1)
    backend_check = device.startswith("cuda")
    rows, t0 = [], time.time()
    decode_s = 0.0
    decoder, graph_error = None, None
    last = _LastKV(model) if kernels else None
    if cuda_graph:
        from kvquant_hf.cuda_graph import CUDAGraphDecoder
    with torch.inference_mode():
        model(ids[:, :prompt_len], position_ids=torch.arange(prompt_len, device=device)[None], use_cache=True,
              **{kw: cache}, logits_to_keep=1)
        done = 0
        for t in range(steps):
            pos = prompt_len + t
            ts = time.time()
            tok, pos_t = ids[:, pos : pos + 1], torch.tensor([[pos]], device=device)
            if cuda_graph and decoder is None:  # capture for the steps up to the next checkpoint
                try:
                    decoder = CUDAGraphDecoder(model, cache, 1, min(check_every - t % check_every, steps - t))
                except Exception as exc:  # noqa: BLE001 - report it and go on eagerly
                    graph_error = f"{type(exc).__name__}: {exc}"
                    log({"cuda_graph_error": graph_error, "step": t})
                    for layer in cache.layers:
                        layer.exit_graph_mode()
                    cuda_graph = False
            if cuda_graph:
                logits = decoder.step(tok, pos_t)[:, -1].float()
            else:
                logits = _step(model, kw, cache, tok, pos_t)
            done = t + 1
            over = time.time() - t0 > max_seconds
            checkpoint = not (done % check_every and done != steps and not over)
            if checkpoint and device.startswith("cuda"):
                torch.cuda.synchronize()
            decode_s += time.time() - ts
            if not checkpoint:
                continue
            if decoder is not None:
                decoder.close()
                decoder = None
            row = {"step": done, "tokens": cache.get_seq_length()}
            step_kv = (dict(last.k), dict(last.v)) if last is not None else None  # before the references run
            # exact model over the whole sequence
            ref = model(ids[:, : pos + 1], use_cache=False, logits_to_keep=1).logits[:, -1].float()
            row["rel_err_vs_fp"] = _rel(logits, ref)
            row["top1_vs_fp"] = bool(logits.argmax(-1).eq(ref.argmax(-1)).all())
            if backend_check:  # the same step through the torch reference path over the same packed storage
                idx = cache.layers[0].length - 1
                saved = [{n: getattr(layer, n)[:, :, idx].clone() for n in ("k_codes", "k_out_val", "k_out_idx",
                          "v_codes", "v_scale", "v_zero", "v_out_val", "v_out_idx")} for layer in cache.layers]
                cache.crop(-1)
                modes = [(layer.backend, layer.triton_quantize) for layer in cache.layers]
                for layer in cache.layers:
                    layer.backend, layer.triton_quantize = "torch", False
                try:
                    ref_t = _step(model, kw, cache, ids[:, pos : pos + 1], torch.tensor([[pos]], device=device))
                finally:
                    for layer, (b, q) in zip(cache.layers, modes):
                        layer.backend, layer.triton_quantize = b, q
                row["rel_diff_vs_torch"] = _rel(logits, ref_t)
                row["top1_vs_torch"] = bool(logits.argmax(-1).eq(ref_t.argmax(-1)).all())
                # layer 0 only: its new K/V are the same in both runs (later layers' inputs differ by the
                # attention backends' rounding, so their stored codes legitimately differ)
                row["storage_bit_identical"] = all(
                    torch.equal(getattr(cache.layers[0], n)[:, :, idx], saved[0][n]) for n in saved[0])
            if kernels and not cuda_graph:
                row.update(kernel_check(cache, *step_kv, model, seed + done))
            accounted = cache.get_memory_footprint(include_spare=True)
            actual = _tensor_bytes(cache)
            alloc = _allocated(device) - base_alloc
            live = _live_tensor_bytes() - base_live
            stats = cache.memory_stats()
            row.update(accounted_MiB=accounted / 2**20, tensor_MiB=actual / 2**20,
                       accounted_over_tensors=accounted / actual, allocator_growth_MiB=alloc / 2**20,
                       unaccounted_MiB=(alloc - actual) / 2**20, live_tensor_growth_MiB=live / 2**20,
                       live_tensors_minus_cache_MiB=(live - actual) / 2**20, n_clipped=stats["n_clipped"],
                       n_nonfinite=stats["n_nonfinite"], ms_per_step=1e3 * decode_s / done)
            rows.append(row)
            log({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
            if over:
                break
    if last is not None:
        last.remove()
    first, last = rows[0], rows[-1]
    summary = {
        "steps_done": done, "steps_requested": steps, "prompt": prompt_len, "final_tokens": last["tokens"],
        "wall_s": time.time() - t0, "ms_per_step": last["ms_per_step"],
        "max_rel_err_vs_fp": max(r["rel_err_vs_fp"] for r in rows),
        "rel_err_vs_fp_first_last": (first["rel_err_vs_fp"], last["rel_err_vs_fp"]),
        "top1_vs_fp": f"{sum(r['top1_vs_fp'] for r in rows)}/{len(rows)}",
        "accounted_over_tensors": (min(r["accounted_over_tensors"] for r in rows),
                                   max(r["accounted_over_tensors"] for r in rows)),
        "unaccounted_MiB_range": (min(r["unaccounted_MiB"] for r in rows), max(r["unaccounted_MiB"] for r in rows)),
        "live_tensors_minus_cache_MiB_range": (min(r["live_tensors_minus_cache_MiB"] for r in rows),
                                               max(r["live_tensors_minus_cache_MiB"] for r in rows)),
        "final_accounted_MiB": last["accounted_MiB"], "final_allocator_growth_MiB": last["allocator_growth_MiB"],
        "n_clipped": last["n_clipped"], "n_nonfinite": last["n_nonfinite"],
    }
    if graph_error:
        summary["cuda_graph_error (fell back to eager)"] = graph_error
    if kernels and "kernel_attn_rel_diff" in last:
        summary.update(max_kernel_attn_rel_diff=max(r["kernel_attn_rel_diff"] for r in rows),
                       kernel_quantize_bit_identical=all(r["kernel_quantize_bit_identical"] for r in rows))
    if backend_check:
        summary.update(max_rel_diff_vs_torch=max(r["rel_diff_vs_torch"] for r in rows),
                       top1_vs_torch=f"{sum(r['top1_vs_torch'] for r in rows)}/{len(rows)}",
                       storage_bit_identical=all(r["storage_bit_identical"] for r in rows))
    return {"rows": rows, "summary": summary}


def markdown(result: dict, title: str, edge_rows: list[dict] | None = None) -> str:
    s = result["summary"]
    lines = [f"# {title}", "", "## Summary", ""]
    def fmt(v):
        if isinstance(v, (tuple, list)):
            return "(" + ", ".join(str(fmt(x)) for x in v) + ")"
        return round(v, 5) if isinstance(v, float) else v

    lines += [f"- {k}: {fmt(v)}" for k, v in s.items()]
    cols = ["step", "tokens", "rel_err_vs_fp", "top1_vs_fp"]
    if "max_rel_diff_vs_torch" in s:
        cols += ["rel_diff_vs_torch", "top1_vs_torch", "storage_bit_identical"]
    if "max_kernel_attn_rel_diff" in s:
        cols += ["kernel_attn_rel_diff", "kernel_quantize_bit_identical"]
    cols += ["accounted_MiB", "tensor_MiB", "allocator_growth_MiB", "unaccounted_MiB", "live_tensors_minus_cache_MiB",
             "n_clipped", "ms_per_step"]
    lines += ["", "## Checkpoints", "", md_table(result["rows"], cols)]
    if edge_rows:
        lines += ["", "## Triton quantize kernels on edge values (vs quant.py, bit for bit)", "",
                  md_table(edge_rows, ["dtype", "edge", "bit_identical", "mismatches"])]
    return "\n".join(lines)


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="tiny | smollm2 | llama3-8b (default: llama3-8b on GPU, tiny on CPU)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the random model (GPU default 4)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="decode steps (default 20000 GPU, 2000 CPU)")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--check-every", type=int, default=None, help="default steps // 20")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--outlier-fraction", type=float, default=0.01)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop early (reported) after this long (default: 120 on GPU, no limit on CPU)")
    ap.add_argument("--kernel-check", action="store_true",
                    help="at checkpoints, Triton kernels vs torch on the live cache (on CPU: the Triton interpreter)")
    ap.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                    help="replay decode steps from CUDA graphs between checkpoints (default: on GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few steps of the tiny model on CPU (checks the script)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.model, args.steps, args.prompt = "cpu", "tiny", args.steps or 20, 32
        args.check_every = args.check_every or 5
    gpu = args.device.startswith("cuda")
    if args.cuda_graph is None:
        args.cuda_graph = gpu
    if args.max_seconds is None:
        args.max_seconds = 120.0 if gpu else float("inf")
    args.model = args.model or ("llama3-8b" if gpu else "tiny")
    args.layers = args.layers or (4 if gpu and args.model != "smollm2" else None)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.steps = args.steps or (20000 if gpu else 2000)
    args.check_every = args.check_every or max(1, args.steps // 20)
    if args.kernel_check and not gpu:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--kernel-check on CPU needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported (by transformers)

    edge_rows = None
    if gpu:
        edge_rows = edge_kernel_check(args.device)
        for r in edge_rows:
            print(r, flush=True)
    model = load_model(args)
    cfg = {"bits": args.bits, "outlier_fraction": args.outlier_fraction, "backend": args.backend}
    result = soak(model, args.device, args.steps, args.prompt, args.check_every, cfg, args.max_seconds, args.seed,
                  log=lambda r: print(r, flush=True), cuda_graph=args.cuda_graph, kernels=args.kernel_check)
    result["summary"]["cuda_graph"] = args.cuda_graph
    if edge_rows:
        result["summary"]["edge_kernels_bit_identical"] = all(r["bit_identical"] for r in edge_rows)
    print(result["summary"], flush=True)
    title = (f"Soak: {result['summary']['steps_done']} decode steps, {args.model} "
             f"({args.layers or 'all'} layers, {args.dtype}, random weights unless smollm2), nuq{args.bits}, "
             f"{args.device}")
    meta = {"model": args.model, "layers": args.layers, "dtype": args.dtype, "cache_config": cfg,
            "cuda_graph": args.cuda_graph,
            "summary": result["summary"]}
    print(write_result(NAME, result["rows"] + ([{"edge": r} for r in edge_rows] if edge_rows else []),
                       markdown(result, title, edge_rows), meta=meta, device=args.device))
    return result


if __name__ == "__main__":
    main()
