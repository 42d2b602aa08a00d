"""Case tables for ``benchmarks.reliability``: padding, threads, planner and generate inputs,
saved caches and malformed signposts, each tried on tiny random models.

Every case is ``(case, expected outcome, check)``; ``check()`` returns ``(observed outcome, handled)``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
from pathlib import Path

import torch

import kvquant_hf
from kvquant_hf import quant
from kvquant_hf.errors import KVQuantConfigError, KVQuantError, SignpostError
from kvquant_hf.generation import cache_kwarg_name
from kvquant_hf.planner import CapacityError
from kvquant_hf.signposts import METADATA_FILE, layer_filename, load_signposts, save_signposts, sha256_file

NEW = 6
GiB = 2**30
MAX_CHARS = 240


def shorten(text: str) -> str:
    """The first line, with the run's temporary folder written <tmp>, cut to MAX_CHARS."""
    text = re.sub(r"/[^\s'\"]*kvq-reliability-[^/\s'\"]*", "<tmp>", (text.strip().splitlines() or [""])[0])
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 3] + "..."


def describe(exc: BaseException) -> str:
    return shorten(f"{type(exc).__name__}: {str(exc).strip()}")


def refused(error, fn, *words, after=None):
    """A check: ``fn()`` must raise ``error`` whose message holds ``words``; ``after()`` -> (note, ok) checks more."""

    def check():
        try:
            fn()
        except KVQuantError as exc:
            ok = isinstance(exc, error) and all(w in str(exc) for w in words)
            observed = describe(exc)
        except Exception as exc:  # noqa: BLE001 - a raw error is an outcome to record
            return describe(exc), False
        else:
            return "no error", False
        if after is not None:
            note, more = after()
            observed, ok = f"{observed} [{note}]", ok and more
        return observed, ok

    return check


# ------------------------------------------------------------------------------------------------------------
# padding
# ------------------------------------------------------------------------------------------------------------
def padded_batch(lengths, total=None, seed=1):
    """Left-padded ids and mask for prompts of the given lengths (random tokens 1..127), and the prompts."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in lengths]
    total = total or max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, total - len(p):] = p
        mask[i, total - len(p):] = 1
    return ids, mask, prompts


def greedy(model, ids, mask, n=NEW, **kw):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


def rows_alone(model, cfg, lengths, total=None, rel=None):
    """Each row of a left-padded batch against the same prompt alone: tokens equal, logits close."""

    def check():
        kw = {"cache_implementation": "kvquant", "cache_config": cfg}
        ids, mask, prompts = padded_batch(lengths, total)
        tokens, scores = greedy(model, ids, mask, **kw)
        same, worst = True, 0.0
        for i, p in enumerate(prompts):
            alone_tokens, alone_scores = greedy(model, p[None], None, **kw)
            same &= tokens[i].tolist() == alone_tokens[0].tolist()
            diff = scores[i] - alone_scores[0]
            worst = max(worst, float(diff.norm() / alone_scores[0].norm()) if rel else float(diff.abs().max()))
        what = "relative logit difference" if rel else "max logit difference"
        return (f"{'equal' if same else 'DIFFERENT'} greedy tokens for every row vs its prompt alone; {what} "
                f"{worst:.1e}"), same and worst <= (rel or 1e-4)

    return check


def lossless_vs_fp(ctx, kind):
    """Quantization made exact (zero key channel 0, the rest outliers, fp32 value scales): a padded batch, chunked
    or not, equals transformers' own cache."""

    def check():
        model = ctx.tiny(kind, window=6)
        h = model.config.num_key_value_heads
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.k_proj.weight.view(h, 16, -1)[:, 0] = 0
        reference = copy.deepcopy(model)
        sp = ctx.random_signposts(model, bits=4)
        lut = torch.linspace(-1.0, 0.875, 16)
        for layer in sp.layers:
            layer.key_signposts, layer.value_signposts = lut.clone(), lut.clone()
            layer.key_lower, layer.key_upper = torch.zeros(h, 16), torch.zeros(h, 16)
        ids, mask, _ = padded_batch([40, 5, 17, 1])
        expected_tokens, expected_scores = greedy(reference, ids, mask)
        original = quant.value_scale_dtype
        quant.value_scale_dtype = lambda dt: torch.float32 if dt == torch.float32 else original(dt)
        try:
            equal, worst = True, 0.0
            for chunk in (16, 7, 0):
                cache = kvquant_hf.KVQuantCache({"bits": 4, "outlier_slots": 15, "sink_tokens": 2, "block_size": 16,
                                                 "prefill_chunk_size": chunk}, signposts=sp, model_config=model.config)
                tokens, scores = greedy(model, ids, mask, **{cache_kwarg_name(model): cache})
                equal &= torch.equal(tokens, expected_tokens)
                worst = max(worst, float((scores - expected_scores).abs().max()))
        finally:
            quant.value_scale_dtype = original
        return (f"chunks 16, 7, unchunked: tokens {'equal' if equal else 'DIFFERENT'}, max logit difference "
                f"{worst:.1e} vs the fp cache"), equal and worst <= 1e-4

    return check


def padding_cases(ctx):
    model = ctx.model
    sp = ctx.random_signposts(model, bits=4)
    cal = {"signposts": sp, "bits": 4}
    ids, mask, _ = padded_batch([12, 12])
    mask[1, 6] = 0

    def middle(chunk):
        return lambda: greedy(model, ids, mask, cache_implementation="kvquant",
                              cache_config={**cal, "prefill_chunk_size": chunk})

    def direct():
        kvquant_hf.patch_model(model)
        cache = kvquant_hf.KVQuantCache({"bits": 4, "sink_tokens": 1, "block_size": 16}, signposts=sp,
                                        model_config=model.config)
        state = {}

        def fn():
            bad = torch.ones(2, 12, dtype=torch.long)
            bad[0, 5] = 0
            model(ids, attention_mask=bad, **{cache_kwarg_name(model): cache})

        def after():
            held = cache.get_seq_length()
            model(ids, attention_mask=torch.ones(2, 12, dtype=torch.long), **{cache_kwarg_name(model): cache})
            state["ok"] = held == 0 and cache.get_seq_length() == 12
            return f"{held} tokens stored; a valid call afterwards stores {cache.get_seq_length()}", state["ok"]

        return refused(KVQuantConfigError, fn, "padding after real tokens", after=after)()

    exp_alone = "greedy tokens equal the prompt alone, logits within 1e-4"
    return [
        ("left-padded batch (40 + 5 tokens), prefill_chunk_size=16, calibrated", exp_alone,
         rows_alone(model, {**cal, "prefill_chunk_size": 16}, [40, 5])),
        ("left-padded batch (40 + 5 tokens), prefill_chunk_size=16, uncalibrated",
         "greedy tokens equal the prompt alone, logits within 2%",
         rows_alone(model, {"bits": 4, "prefill_chunk_size": 16}, [40, 5], rel=0.02)),
        ("padding spanning four whole chunks (chunk 8; rows of 40, 5, 16, 32)", exp_alone,
         rows_alone(model, {**cal, "prefill_chunk_size": 8}, [40, 5, 16, 32])),
        ("padding spanning seven whole chunks (chunk 5; rows of 40, 5, 25)", exp_alone,
         rows_alone(model, {**cal, "prefill_chunk_size": 5}, [40, 5, 25])),
        ("every row padded longer than a chunk (16 + 6 tokens padded to 32, chunk 8)", exp_alone,
         rows_alone(model, {**cal, "prefill_chunk_size": 8, "sink_tokens": 2}, [16, 6], total=32)),
        ("padded row with fewer real tokens than sink slots (3 tokens, sink 8, chunk 16)",
         "its sink takes its first generated tokens, as alone: " + exp_alone,
         rows_alone(model, {**cal, "prefill_chunk_size": 16, "sink_tokens": 8}, [40, 3])),
        ("exact quantization, padded batch of 40/5/17/1 tokens (Llama)", "equal to transformers' cache",
         lossless_vs_fp(ctx, "llama")),
        ("exact quantization, padded batch of 40/5/17/1 tokens (Mistral, window 6)", "equal to transformers' cache",
         lossless_vs_fp(ctx, "mistral")),
        ("padding in the middle of a row, generate, prefill_chunk_size=4", "KVQuantConfigError before any forward",
         refused(KVQuantConfigError, middle(4), "padding after real tokens", "[1]")),
        ("padding in the middle of a row, generate, unchunked", "KVQuantConfigError before any forward",
         refused(KVQuantConfigError, middle(0), "padding after real tokens", "[1]")),
        ("padding in the middle of a row, direct KVQuantCache use",
         "KVQuantConfigError, nothing stored, cache stays usable", direct),
    ]


# ------------------------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------------------------
def make_gate():
    """A streamer that holds its generate call on the prompt until released."""
    from transformers.generation.streamers import BaseStreamer

    class Gate(BaseStreamer):
        def __init__(self):
                self.inside, self.release = threading.Event(), threading.Event()

        def put(self, value):
            if not self.inside.is_set():
                self.inside.set()
                self.release.wait(60)

        def end(self):
            pass

    return Gate()


def returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out["past_key_values"]


def held_inside(model, first, second):
    """Run ``first(gate)`` in a thread, and ``second()`` here while the first call is held inside generate."""
    gate, results = make_gate(), {}

    def run():
        try:
            results["a"] = first(gate)
        except Exception as exc:  # noqa: BLE001
            results["a"] = exc

    a = threading.Thread(target=run)
    a.start()
    try:
        while a.is_alive() and not gate.inside.wait(0.05):
            pass
        try:
            results["b"] = second()
        except Exception as exc:  # noqa: BLE001
            results["b"] = exc
    finally:
        gate.release.set()
        a.join(60)
    return results


def thread_cases(ctx):
    common = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    prompt = ctx.prompt

    def second_thread(via_kwargs):
        def check():
            model = ctx.tiny()
            model.generation_config.cache_implementation = "kvquant"
            model.generation_config.cache_config = {"bits": 3}
            before = model.generation_config.to_dict()
            extra = {"cache_implementation": "kvquant", "cache_config": {"bits": 2}} if via_kwargs else {}
            res = held_inside(model, lambda gate: model.generate(prompt, streamer=gate, **common),
                              lambda: model.generate(prompt, **common, **extra))
            kinds = [type(returned_cache(r)).__name__ if not isinstance(r, Exception) else describe(r)
                     for r in (res["a"], res["b"])]
            same = model.generation_config.to_dict() == before
            return (f"caches: {kinds[0]}, {kinds[1]}; model generation_config unchanged: {same}",
                    kinds == ["KVQuantCache"] * 2 and same)
        return check

    def shared_cache():
        model = ctx.tiny()
        cache = kvquant_hf.KVQuantCache({"bits": 4}, model_config=model.config)
        kw = {cache_kwarg_name(model): cache}
        res = held_inside(model, lambda gate: model.generate(prompt, max_new_tokens=2, do_sample=False,
                                                             streamer=gate, **kw),
                          lambda: model.generate(prompt, max_new_tokens=2, do_sample=False, **kw))
        b, first_ok = res["b"], not isinstance(res["a"], Exception)
        if not isinstance(b, Exception):
            return "no error", False
        return (f"{describe(b)} [the first call completed: {first_ok}]",
                isinstance(b, KVQuantConfigError) and "already in use" in str(b) and first_ok)

    def patched_twice():
        model = ctx.tiny()
        stock = model.generate(prompt, max_new_tokens=4, do_sample=False)
        kvquant_hf.patch_model(model)
        model._kvquant_patched = False  # a second thread read the flag before the first one set it
        kvquant_hf.patch_model(model)
        same = torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), stock)
        kvquant_hf.unpatch_model(model)
        restored = all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
        return (f"transformers' cache output unchanged: {same}; unpatch restores every layer: {restored}",
                same and restored)

    def passed_config():
        from transformers import GenerationConfig

        model = ctx.tiny()
        model.generation_config.cache_implementation = "kvquant"
        model.generation_config.cache_config = {"bits": 3}
        gc = GenerationConfig(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        cache = returned_cache(model.generate(prompt, generation_config=gc))
        bits = getattr(getattr(cache, "config", None), "key_bits", None)
        return f"{type(cache).__name__} with key_bits={bits}", isinstance(cache, kvquant_hf.KVQuantCache) and bits == 3

    return [
        ("2 threads, model generation_config 'kvquant', second starting inside the first call",
         "both get a KVQuantCache; model config unchanged", second_thread(False)),
        ("same, the second thread passing cache_implementation as a keyword",
         "both get a KVQuantCache; model config unchanged", second_thread(True)),
        ("one KVQuantCache object in two concurrent generate calls", "KVQuantConfigError ('already in use')",
         shared_cache),
        ("two first calls racing to patch the model", "each layer patched once", patched_twice),
        ("passed GenerationConfig without cache_implementation, model config 'kvquant'", "KVQuantCache",
         passed_config),
    ]


# ------------------------------------------------------------------------------------------------------------
# planner and generate inputs, saved caches
# ------------------------------------------------------------------------------------------------------------
def planner_cases(ctx):
    model, prompt = ctx.model, ctx.prompt
    kw = cache_kwarg_name(model)

    def plan(**over):
        args = {"model": model, "cache_config": {"bits": 4}, "free_memory": {"cpu": 2 * GiB}, **over}
        return lambda: kvquant_hf.plan_capacity(**args)

    allocations = []
    original = kvquant_hf.KVQuantLayer.lazy_initialization

    def counting(self, k, v):
        allocations.append(self.layer_idx)
        return original(self, k, v)

    def gen(ids=prompt, **over):
        def fn():
            allocations.clear()
            kvquant_hf.KVQuantLayer.lazy_initialization = counting
            try:
                model.generate(ids, do_sample=False, cache_implementation="kvquant", **over)
            finally:
                kvquant_hf.KVQuantLayer.lazy_initialization = original
        return fn

    def none_allocated():
        return f"{len(allocations)} layers allocated", not allocations

    def reserve(tokens):
        cache = kvquant_hf.KVQuantCache({"bits": 4}, model_config=model.config)
        return lambda: cache.reserve(tokens)

    def saved(how):
        def check():
            cfg = {"bits": 4, "sink_tokens": 2, "block_size": 16, "prefill_chunk_size": 16, "outlier_slots": 1}
            sp = ctx.random_signposts(model, bits=4)
            ids = torch.randint(1, 128, (1, 37), generator=torch.Generator().manual_seed(3))

            def run(ids, cache, n):
                return model.generate(ids, max_new_tokens=n, do_sample=False, **{kw: cache})

            full = run(ids, kvquant_hf.KVQuantCache(cfg, signposts=sp, model_config=model.config), 12)
            cache = kvquant_hf.KVQuantCache(cfg, signposts=sp, model_config=model.config)
            first = run(ids, cache, 5)
            if how == "pickle":
                import pickle

                loaded = pickle.loads(pickle.dumps(cache))
            else:
                path = ctx.tmp / "prompt_cache.pt"
                torch.save(cache, path)
                loaded = torch.load(path, weights_only=False)
            same = torch.equal(run(first, loaded, 7), full)
            return (f"loads; continued greedy generation {'equals' if same else 'DIFFERS from'} the uninterrupted "
                    "run"), same
        return check

    cfg_err = "KVQuantConfigError naming the argument"
    rows = [
        ("plan_capacity(model='meta-llama/Llama-3.1-8B')", cfg_err, plan(model="meta-llama/Llama-3.1-8B"),
         ("model must be",)),
        ("plan_capacity(model=<a config>)", "KVQuantConfigError pointing to model_config=", plan(model=model.config),
         ("model_config=",)),
        ("plan_capacity(model=<a tensor>)", cfg_err, plan(model=torch.zeros(3)), ("model must be",)),
        ("plan_capacity(dtype='float17')", "KVQuantConfigError listing dtypes", plan(dtype="float17"),
         ("dtype='float17'",)),
        ("plan_capacity(dtype=torch.int8)", "KVQuantConfigError listing dtypes", plan(dtype=torch.int8),
         ("dtype=torch.int8",)),
    ]
    for arg, values in (("batch_size", ("2", 2.5, True, None)), ("prompt_tokens", ("2", 2.5, True))):
        rows += [(f"plan_capacity({arg}={v!r})", cfg_err, plan(**{arg: v}), (f"{arg}={v!r}",)) for v in values]
    for value in ("80GB", -1, float("nan")):
        rows.append((f"plan_capacity(free_memory={value!r})", cfg_err, plan(free_memory=value), ("free_memory",)))
    for value, word in (("auto", "device_map=str"), (["cpu", "disk"], "'disk'")):
        rows.append((f"plan_capacity(device_map={value!r})", cfg_err,
                     plan(model=None, model_config=model.config, device_map=value), (word,)))
    cases = [(c, e, refused(KVQuantConfigError, f, *w)) for c, e, f, w in rows]
    cases.append(("plan_capacity(prompt_tokens=None)", "accepted: None is the documented default (no prompt)",
                  lambda: (f"accepted: max_tokens={plan(prompt_tokens=None)().max_tokens}", True)))
    before = "before allocating"
    cases += [
        ("generate(kvquant) with block_size=2**40", f"CapacityError {before}, on CPU too",
         refused(CapacityError, gen(max_new_tokens=4, cache_config={"block_size": 2**40}), "on cpu",
                 after=none_allocated)),
        ("generate(kvquant) with max_new_tokens=2**31-100 (beyond host memory)", f"CapacityError {before} (CPU)",
         refused(CapacityError, gen(max_new_tokens=2**31 - 100), "on cpu", after=none_allocated)),
        ("generate(kvquant) with prompt + max_new_tokens > 2**31-1", "KVQuantConfigError (int32 positions)",
         refused(KVQuantConfigError, gen(max_new_tokens=2**31), "int32", after=none_allocated)),
    ]
    for value in ("5", 5.5, True, 0, -3):
        cases.append((f"generate(kvquant) with max_new_tokens={value!r}", cfg_err,
                      refused(KVQuantConfigError, gen(max_new_tokens=value), f"max_new_tokens={value!r}",
                              after=none_allocated)))
    cases.append(("generate(kvquant) with an empty prompt", "KVQuantConfigError",
                  refused(KVQuantConfigError, gen(ids=prompt[:, :0], max_new_tokens=4), "prompt is empty",
                          after=none_allocated)))
    for value in (2**31, -1, "16"):
        cases.append((f"cache.reserve({value!r})", "KVQuantConfigError",
                      refused(KVQuantConfigError, reserve(value), "reserve")))
    cases += [
        ("filled KVQuantCache through pickle", "loads; continued generation equals the uninterrupted run",
         saved("pickle")),
        ("filled KVQuantCache through torch.save + torch.load(weights_only=False)",
         "loads; continued generation equals the uninterrupted run", saved("torch")),
    ]
    return cases


# ------------------------------------------------------------------------------------------------------------
# signposts
# ------------------------------------------------------------------------------------------------------------
DELETE = object()


def signpost_cases(ctx):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = ctx.model
    count = [0]

    def fresh():
        count[0] += 1
        return save_signposts(ctx.random_signposts(model, bits=4), ctx.tmp / f"sp{count[0]}")

    def load(path):
        return lambda: model.generate(ctx.prompt, max_new_tokens=2, do_sample=False, cache_implementation="kvquant",
                                      cache_config={"signposts": path, "bits": 4})

    def meta_case(edit):
        def fn():
            folder = fresh()
            meta_path = Path(folder, METADATA_FILE)
            meta = json.loads(meta_path.read_text())
            meta = edit(meta)
            meta_path.write_text(json.dumps(meta))
            load(folder)()
        return fn

    def field(dotted, value):
        def edit(meta):
            *parents, leaf = dotted.split("/")
            node = meta
            for key in parents:
                node = node[key]
            if value is DELETE:
                del node[leaf]
            else:
                node[leaf] = value
            return meta
        return meta_case(edit)

    def layer(idx, change, dtype=None):
        def fn():
            folder = fresh()
            path = os.path.join(folder, layer_filename(idx))
            with safe_open(path, framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
                header = f.metadata() or {}
            change(tensors)
            save_file(tensors, path, metadata=header)
            meta = json.loads(Path(folder, METADATA_FILE).read_text())
            meta["files"][layer_filename(idx)] = sha256_file(path)
            if dtype:
                meta["calibration"]["model_dtype"] = dtype
            Path(folder, METADATA_FILE).write_text(json.dumps(meta))
            load(folder)()
        return fn

    def swapped():
        folder = fresh()
        a, b = os.path.join(folder, layer_filename(0)), os.path.join(folder, layer_filename(1))
        os.rename(a, a + ".tmp")
        os.rename(b, a)
        os.rename(a + ".tmp", b)
        meta = json.loads(Path(folder, METADATA_FILE).read_text())
        meta["files"] = {n: sha256_file(os.path.join(folder, n)) for n in meta["files"]}
        Path(folder, METADATA_FILE).write_text(json.dumps(meta))
        load(folder)()

    import huggingface_hub

    hub_calls = []

    def hub(fn, offline=True, cwd=None):
        def wrapped():
            real, old_cwd = huggingface_hub.snapshot_download, os.getcwd()
            old_env = os.environ.get("HF_HUB_OFFLINE")

            def fake(repo_id, revision=None, **kwargs):
                hub_calls.append((repo_id, revision, kwargs.get("local_files_only")))
                raise FileNotFoundError("not in the local cache")

            huggingface_hub.snapshot_download = fake
            if offline:
                os.environ["HF_HUB_OFFLINE"] = "1"
            else:
                os.environ.pop("HF_HUB_OFFLINE", None)
            hub_calls.clear()
            try:
                if cwd:
                    os.chdir(cwd)
                fn()
            finally:
                os.chdir(old_cwd)
                huggingface_hub.snapshot_download = real
                if old_env is None:
                    os.environ.pop("HF_HUB_OFFLINE", None)
                else:
                    os.environ["HF_HUB_OFFLINE"] = old_env
        return wrapped

    def no_download():
        return f"Hub calls: {hub_calls}", not hub_calls

    def local_only():
        return f"Hub calls: {hub_calls}", all(c[2] for c in hub_calls)

    def extra_file(meta):
        meta["files"]["layer_002.safetensors"] = "0" * 64
        return meta

    def bad_checksum(meta):
        meta["files"][layer_filename(0)] = "abc"
        return meta

    se = "SignpostError naming the field"
    rows = [(f"metadata bits={v!r}", se, field("bits", v), "'bits'") for v in ("4", 4.0, True, 16)]
    rows += [(f"metadata format_version={v!r}", se, field("format_version", v), "format_version") for v in (True, "1")]
    rows += [(f"metadata model={v!r} (not an object)", se, field("model", v), "'model'") for v in (["llama"], "llama")]
    rows += [(f"metadata model.num_hidden_layers={v!r}", se, field("model/num_hidden_layers", v),
              "'model.num_hidden_layers'") for v in ("2", -2, 0, 10**12, None)]
    rows += [
        ("metadata files missing", se, field("files", DELETE), "'files'"),
        ("metadata files a list", se, field("files", ["layer_000.safetensors"]), "'files'"),
        ("metadata files with an extra entry", se, meta_case(extra_file), "'files' lists 3 files"),
        ("metadata files with a malformed checksum", se, meta_case(bad_checksum), "'files.layer_000.safetensors'"),
    ]
    rows += [(f"metadata outlier_fraction={v!r}", se, field("outlier_fraction", v), "'outlier_fraction'")
             for v in ("x", 5.0, float("nan"))]
    rows += [
        ("metadata.json a list", se, meta_case(lambda m: [1, 2]), "not a JSON object"),
        ("key table x1000 (checksum updated)", "SignpostError",
         layer(1, lambda t: t.update(key_signposts=t["key_signposts"] * 1000)), "outside the normalized range"),
        ("value table in [2, 7] (checksum updated)", "SignpostError",
         layer(1, lambda t: t.update(value_signposts=torch.linspace(2.0, 7.0, 16))), "outside the normalized range"),
        ("unsorted key table (checksum updated)", "SignpostError",
         layer(1, lambda t: t.update(key_signposts=torch.linspace(1.0, -1.0, 16))), "is not sorted"),
        ("qnorm with a negative standard deviation", "SignpostError",
         layer(1, lambda t: t.update(key_qnorm=torch.tensor([0.0, -0.5, 0.0, 0.5]))), "standard deviations"),
        ("integer tensor in a layer file", "SignpostError",
         layer(1, lambda t: t.update(key_qnorm=torch.tensor([0, 1, 0, 1]))), "has dtype torch.int64"),
        ("thresholds 1e30 with a float16 calibration", "SignpostError",
         layer(0, lambda t: t.update(key_upper=t["key_upper"] + 1e30), dtype="float16"), "float16"),
        ("layer files swapped (checksums swapped too)", "SignpostError (header layer mismatch)", swapped,
         "holds layer='1' in its header"),
        ("signposts path is metadata.json (a file)", "SignpostError 'is a file, not a folder'",
         lambda: load(os.path.join(fresh(), METADATA_FILE))(), "is a file, not a folder"),
    ]
    cases = [(c, e, refused(SignpostError, f, w)) for c, e, f, w in rows]
    for value in (42, "", ["a"]):
        cases += [(f"cache_config signposts={value!r}", "typed error: not a folder path, pass the calibrate.py folder",
                   refused(KVQuantError, load(value), "calibrate.py")),
                  (f"load_signposts({value!r})", "SignpostError 'is not a folder path'",
                   refused(SignpostError, lambda v=value: load_signposts(v), "is not a folder path"))]
    cases.append(("local 'owner/name' that does not exist (HF_HUB_OFFLINE unset)",
                  "SignpostError, nothing downloaded, suggests hf://owner/name",
                  refused(SignpostError, hub(load("someone/signposts"), offline=False,
                                                  cwd=ctx.tmp), "nothing was downloaded",
                          "hf://someone/signposts", after=no_download)))
    cases.append(("hf://owner/name@rev with HF_HUB_OFFLINE=1 and no local snapshot",
                  "SignpostError naming repo and revision, Hub not contacted",
                  refused(SignpostError, hub(load("hf://someone/signposts@v2")), "'someone/signposts'", "'v2'",
                          "HF_HUB_OFFLINE", after=local_only)))
    for value in ("hf://justaname", "hf://a/b@", "hf://a/b/c", "hf://"):
        cases.append((f"malformed reference {value!r}", "SignpostError, no download",
                      refused(SignpostError, hub(load(value)), "is not a Hugging Face Hub reference",
                              after=no_download)))
    return cases
