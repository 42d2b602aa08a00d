"""The fused RMSNorm (``kvquant_hf.kernels.rms_norm``, opt-in ``fused_norms``) under the Triton interpreter against
transformers' ``LlamaRMSNorm``, and the model patch that routes the norms to it."""

from __future__ import annotations

# (TRITON_INTERPRET=1 is set by conftest.py on machines without a GPU; on a GPU machine these modules skip)
import pytest
import torch
from conftest import interpreted_kernel_modules, interpreted_module, make_tiny_llama

from kvquant_hf import KVQuantConfig
from kvquant_hf.errors import KVQuantConfigError

interpreted_kernel_modules()  # skips this module unless the interpreter is on


def _rms_norm():
    return interpreted_module("rms_norm", "_rms_norm_kernel").rms_norm


def _norm(n, dtype, wdtype=None, eps=1e-5, seed=0):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(n, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(seed)))
    return norm.to(wdtype or dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [64, 96, 576])
def test_matches_llama_rms_norm(dtype, n):
    rms_norm = _rms_norm()
    norm = _norm(n, dtype)
    x = (4 * torch.randn(3, 5, n, generator=torch.Generator().manual_seed(1))).to(dtype)
    want = norm(x)
    got = rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        # the variance is summed in another order (and the interpreter truncates float32 -> bf16): at most one
        # unit in the last place for a few elements
        ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
        diff = (got.float() - want.float()).abs()
        assert (diff <= 2 * ulp * want.float().abs().clamp_min(1e-3)).all()
        if dtype == torch.float16:  # (bf16: the interpreter's truncation makes most elements differ by one ulp)
            assert (diff > 0).float().mean() < 0.05


def test_weight_dtype_promotes_like_transformers_and_strided_rows():
    rms_norm = _rms_norm()
    norm = _norm(64, torch.float16, wdtype=torch.float32)
    x = torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(2)).to(torch.float16).transpose(0, 1)
    want = norm(x)
    got = rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == torch.float32 == want.dtype
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, norm.weight[:32], 1e-5)


def test_fuse_rms_norms_patches_the_model_and_undoes_it(monkeypatch):
    import kvquant_hf.kernels.rms_norm as rn
    from kvquant_hf.models import norms

    rms_norm = _rms_norm()
    monkeypatch.setattr(norms, "DEVICE_TYPES", ("cpu",))  # route CPU inputs to the (interpreted) kernel
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        n = norms.fuse_rms_norms(model)
        assert n == 2 * model.config.num_hidden_layers + 1  # input/post-attention per layer and the final norm
        assert norms.fuse_rms_norms(model) == n  # idempotent
        calls, add_calls = [], []
        add_rms_norm = _module().add_rms_norm
        monkeypatch.setattr(rn, "rms_norm", lambda x, w, eps: calls.append(1) or rms_norm(x, w, eps))
        monkeypatch.setattr(rn, "add_rms_norm", lambda r, x, w, eps: add_calls.append(1) or add_rms_norm(r, x, w, eps))
        got = model(ids).logits
        layers = model.config.num_hidden_layers
        # every norm went through a kernel: the post-attention ones together with the residual add
        assert len(add_calls) == layers and len(calls) == n - layers
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        norms.unfuse_rms_norms(model)
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    assert not any("_kvquant_norm_forward" in m.__dict__ or "_kvquant_layer_forward" in m.__dict__
                   for m in model.modules())


def _module():
    return interpreted_module("rms_norm", "_add_rms_norm_kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_add_rms_norm_matches_the_torch_add_and_llama_rms_norm(dtype):
    add_rms_norm = _module().add_rms_norm
    norm = _norm(96, dtype)
    g = torch.Generator().manual_seed(11)
    r = (4 * torch.randn(2, 3, 96, generator=g)).to(dtype)
    x = (2 * torch.randn(2, 3, 96, generator=g)).to(dtype)
    s_want = r + x
    y_want = norm(s_want)
    s, y = add_rms_norm(r, x, norm.weight, norm.variance_epsilon)
    assert s.dtype == dtype and y.dtype == y_want.dtype and s.shape == y.shape == r.shape
    if dtype == torch.bfloat16:  # the interpreter truncates float32 -> bf16 instead of rounding
        torch.testing.assert_close(s, s_want, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(s, s_want)  # the residual sum is rounded like the torch add
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_want, rtol=1e-6, atol=1e-6)
    else:
        ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
        assert ((y.float() - y_want.float()).abs() <= 3 * ulp * y_want.float().abs().clamp_min(1e-3)).all()
    with pytest.raises(ValueError, match="must match"):
        add_rms_norm(r, x[..., :48], norm.weight, 1e-5)
    with pytest.raises(ValueError, match="weight has shape"):
        add_rms_norm(r, x, norm.weight[:32], 1e-5)


def test_fused_norms_config_is_validated():
    assert KVQuantConfig(fused_norms=True).fused_norms
    with pytest.raises(KVQuantConfigError, match="fused_norms"):
        KVQuantConfig(fused_norms="yes")


def test_generate_with_fused_norms_patches_the_norms_and_keeps_the_tokens():
    model = make_tiny_llama()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="kvquant")
    plain = model.generate(ids, cache_config={"bits": 4}, **kw)
    assert not getattr(model, "_kvquant_fused_norms", False)
    fused = model.generate(ids, cache_config={"bits": 4, "fused_norms": True}, **kw)
    assert model._kvquant_fused_norms  # patched; on CPU the norms take the original forward (CUDA-only kernel)
    assert sum("_kvquant_norm_forward" in m.__dict__ for m in model.modules()) == 2 * 2 + 1
    assert torch.equal(plain, fused)
    from kvquant_hf.models import unpatch_model

    unpatch_model(model)  # undoes the norms too
    assert not model._kvquant_fused_norms
    assert not any("_kvquant_norm_forward" in m.__dict__ for m in model.modules())


def _cpu_fusion(monkeypatch):
    from kvquant_hf.models import norms

    _module()  # the interpreted kernels
    monkeypatch.setattr(norms, "DEVICE_TYPES", ("cpu",))
    return norms


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_fused_layer_forward_in_generate_with_padding(monkeypatch, arch):
    """The decoder-layer patch (residual add + post-attention norm in one kernel) through generate with the
    KVQuantCache, a left-padded batch of two: the same tokens and scores as without fused_norms."""
    from conftest import make_tiny_mistral

    norms = _cpu_fusion(monkeypatch)
    model = make_tiny_llama() if arch == "llama" else make_tiny_mistral()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="kvquant",
              output_scores=True, return_dict_in_generate=True)
    plain = model.generate(ids, cache_config={"bits": 4}, **kw)
    calls = []
    norms.fuse_rms_norms(model)
    import kvquant_hf.kernels.rms_norm as rms_norm_kernels  # the module fuse_rms_norms calls into

    add = rms_norm_kernels.add_rms_norm
    monkeypatch.setattr(rms_norm_kernels, "add_rms_norm", lambda *a: calls.append(1) or add(*a))
    fused = model.generate(ids, cache_config={"bits": 4, "fused_norms": True}, **kw)
    assert len(calls) == 2 * 5  # 2 layers x 5 forwards (the prefill and 4 steps; the 5th token is not fed back)
    assert torch.equal(plain.sequences, fused.sequences)
    for a, b in zip(plain.scores, fused.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    norms.unfuse_rms_norms(model)


def test_fused_norms_fall_back_for_autocast_training_and_accelerate_hooks(monkeypatch):
    norms = _cpu_fusion(monkeypatch)
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(ids).logits
    norms.fuse_rms_norms(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids).logits  # attention output bf16, residual float32: the stock promotion, no error
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    loss = model(ids, labels=ids).loss  # autograd on: the stock ops (the kernels have no backward)
    loss.backward()
    assert model.model.layers[0].post_attention_layernorm.weight.grad is not None
    norms.unfuse_rms_norms(model)
    hooked = make_tiny_llama()
    hooked.model.layers[0]._hf_hook = object()
    wrapper = hooked.model.layers[0].forward
    hooked.model.norm._hf_hook = object()
    n = norms.fuse_rms_norms(hooked)
    assert n == 2 * 2  # the hooked final norm keeps its forward
    assert "_kvquant_layer_forward" not in hooked.model.layers[0].__dict__
    assert "_kvquant_layer_forward" in hooked.model.layers[1].__dict__
    norms.unfuse_rms_norms(hooked)
    assert hooked.model.layers[0].forward == wrapper
