"""KVQuantCache across dtypes, devices and backends (CPU here; the CUDA cases are marked gpu)."""

from __future__ import annotations

import pytest
import torch
from cache_helpers import chunked_logits, forward, make_lossless, make_signposts, synthetic_inputs
from conftest import make_tiny_llama

from kvquant_hf import quant
from kvquant_hf.cache import KVQuantCache, KVQuantLayer, resolve_backend
from kvquant_hf.config import KVQuantConfig
from kvquant_hf.errors import BackendUnavailableError
from kvquant_hf.generation import cache_kwarg_name
from kvquant_hf.models import patch_model


# --------------------------------------------------------------------------------------------
# dtypes and devices
# --------------------------------------------------------------------------------------------
def _cpu_supports(dtype) -> bool:
    try:
        x = torch.randn(2, 8, dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None])
        (x @ x.T).sum().item()
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_model_dtypes(dtype):
    if not _cpu_supports(dtype):
        pytest.skip(f"this CPU build lacks {dtype} matmul/sdpa")
    model = make_tiny_llama()
    factory, reference = make_lossless(model)  # scales in the model dtype: exact for bf16/fp16
    model.to(dtype)
    reference.to(dtype)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(ids).logits.float()
    cache = factory()
    got = chunked_logits(model, ids, cache, (8,)).float()
    layer = cache.layers[0]
    assert layer.sink_k.dtype == dtype and layer.k_out_val.dtype == dtype
    assert layer.v_scale.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # our attention accumulates in float32, transformers' in the model dtype: compare at that dtype's precision
    tol = {torch.float32: 2e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_backend_selection():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(BackendUnavailableError, match="backend='torch'"):
        resolve_backend("triton", torch.device("cpu"))
    layer = KVQuantLayer(KVQuantConfig(backend="triton"))
    with pytest.raises(BackendUnavailableError):
        layer.attend(synthetic_inputs(1, 4, 2, 3, 0))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_hd64(model_type: str = "llama", sliding_window: int | None = None):
    """A small random model with head_dim 64 (the Triton path needs a power of two >= 32): 1 layer, 4/2 heads."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = {
        "vocab_size": 128, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    if model_type == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_lossless_matches_unpatched_model(dtype):
    model = make_tiny_llama()
    factory, reference = make_lossless(model)  # scales in the model dtype: exact for fp16/bf16
    model.to("cuda", dtype)
    reference.to("cuda", dtype)
    ids = torch.randint(0, 128, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits.float()
    cache = factory(backend="auto")
    got = chunked_logits(model, ids, cache, (20, 7)).float()
    layer = cache.layers[0]
    assert layer.k_codes.device.type == "cuda" and layer.backend == "torch"  # head_dim 16: torch path
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_cuda
def test_cuda_triton_backend_refuses_head_dim_16():
    model = patch_model(make_tiny_llama()).cuda()
    cache = KVQuantCache(backend="triton", model_config=model.config)
    with pytest.raises(BackendUnavailableError, match="head_dim"):
        forward(model, torch.ones(1, 4, dtype=torch.long, device="cuda"), cache)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["llama", "mistral-window12"])
def test_cuda_triton_and_torch_backends_agree(kind, dtype):
    model = make_hd64("mistral", 12) if kind.startswith("mistral") else make_hd64()
    model = patch_model(model).to("cuda", dtype)
    h = model.config.num_key_value_heads
    lut = quant.normal_float_signposts(3)
    sp = make_signposts(model, lut, -0.6, 0.6, bits=3)
    for layer_sp in sp.layers:  # make_signposts assumes head_dim 16
        layer_sp.key_lower, layer_sp.key_upper = torch.full((h, 64), -0.6), torch.full((h, 64), 0.6)
    sp.metadata["model"]["head_dim"] = 64
    ids = torch.randint(0, 128, (3, 70), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    caches, logits = {}, {}
    kw = cache_kwarg_name(model)
    for backend in ("torch", "triton"):
        cache = KVQuantCache({"bits": 3, "outlier_slots": 2, "sink_tokens": 2, "block_size": 32, "backend": backend},
                             signposts=sp, model_config=model.config)
        outs = []
        with torch.no_grad():
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            outs.append(model(ids[:, :50], attention_mask=mask[:, :50], position_ids=pos[:, :50], **{kw: cache}).logits)
            outs.append(model(ids[:, 50:54], attention_mask=mask[:, :54], position_ids=pos[:, 50:54], **{kw: cache}).logits)
            for t in range(54, 70):
                outs.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                                  **{kw: cache}).logits)
        caches[backend], logits[backend] = cache, torch.cat(outs, 1).float()
    # one layer: it sees identical inputs, so its storage must be bit-identical
    a, b = caches["torch"].layers[0], caches["triton"].layers[0]
    assert b.backend == "triton" and b.triton_quantize
    n = a.length
    for name in ("k_codes", "k_out_idx", "k_out_val", "v_codes", "v_scale", "v_zero", "v_out_idx", "v_out_val"):
        assert torch.equal(getattr(a, name)[:, :, :n], getattr(b, name)[:, :, :n]), name
    assert a.n_clipped == b.n_clipped
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_cuda
def test_cuda_generate_auto_backend():
    model = make_hd64().to("cuda", torch.float16)
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(1, 128, (2, 30), device="cuda")
    out = model.generate(prompt, max_new_tokens=16, do_sample=False, num_beams=2, cache_implementation="kvquant",
                         cache_config={"bits": 4}, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out["past_key_values"]
    assert out.sequences.shape == (2, 46)
    assert cache.layers[0].backend == "triton"
    assert cache.memory_stats()["seq_length"] == 45
