"""Opt-in ``fused_projections``: one GEMV for q/k/v and for gate/up (``kvquant_hf.models.projections``) and the
SiLU·mul kernel (``kvquant_hf.kernels.silu_mul``) under the Triton interpreter against torch."""

from __future__ import annotations

# (TRITON_INTERPRET=1 is set by conftest.py on machines without a GPU; on a GPU machine these modules skip)
import pytest
import torch
from conftest import interpreted_kernel_modules, interpreted_module, make_tiny_llama, make_tiny_mistral
from torch import nn

from kvquant_hf import KVQuantConfig
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.models import projections, unpatch_model

interpreted_kernel_modules()  # skips this module unless the interpreter is on


def _silu_mul():
    return interpreted_module("silu_mul", "_silu_mul_kernel").silu_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inter", [7, 64, 1100])
def test_silu_mul_matches_torch(dtype, inter):
    silu_mul = _silu_mul()
    gu = (3 * torch.randn(2, 3, 2 * inter, generator=torch.Generator().manual_seed(inter))).to(dtype)
    gate, up = gu.split(inter, dim=-1)
    want = nn.functional.silu(gate) * up
    got = silu_mul(gu)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # numpy's exp under the interpreter may round differently from torch's: one ulp at most, rarely
        ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
        diff = (got.float() - want.float()).abs()
        assert (diff <= 2 * ulp * want.float().abs().clamp_min(1e-2)).all()
        if dtype == torch.float16:  # (bf16: the interpreter truncates float32 -> bf16, so most elements differ)
            assert (diff > 0).float().mean() < 0.1


def test_silu_mul_rejects_bad_input():
    silu_mul = _silu_mul()
    with pytest.raises(ValueError, match="even number"):
        silu_mul(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        silu_mul(torch.zeros(2, 4, dtype=torch.int32))
    # strided rows (a transposed view) are made contiguous first
    gu = torch.randn(6, 3, 8).transpose(0, 1)
    gate, up = gu.split(4, dim=-1)
    torch.testing.assert_close(silu_mul(gu), nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_mistral], ids=["llama", "mistral"])
def test_fuse_projections_keeps_the_model_and_shares_memory(make, monkeypatch):
    silu_mul = _silu_mul()
    monkeypatch.setattr(projections, "DEVICE_TYPES", ("cpu",))  # the MLP takes the (interpreted) kernel on CPU
    model = make()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        before = {n: p.clone() for n, p in model.named_parameters()}
        n = projections.fuse_projections(model)
        projections.kernels = type("K", (), {"silu_mul": staticmethod(silu_mul)})
        assert n == 2 * model.config.num_hidden_layers
        assert projections.fuse_projections(model) == n  # idempotent
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            fused = attn.__dict__["_kvquant_qkv"]
            assert fused.sizes == (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
            # the separate weights are views of the fused one: no second copy of the weights
            assert {_storage(attn.q_proj.weight), _storage(attn.k_proj.weight), _storage(attn.v_proj.weight)} == {
                _storage(fused.weight)}
            assert _storage(mlp.gate_proj.weight) == _storage(mlp.up_proj.weight)
        for name, p in model.named_parameters():  # values unchanged
            assert torch.equal(p, before[name]), name
        # the stock forward (no kvquant cache) still runs on the views, the MLP through the fused path
        calls = []
        orig = projections.kernels.silu_mul
        projections.kernels = type("K", (), {"silu_mul": staticmethod(lambda x: calls.append(1) or orig(x))})
        got = model(ids).logits
        assert len(calls) == model.config.num_hidden_layers
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        projections.unfuse_projections(model)
        assert not model._kvquant_fused_projections
        for layer in model.model.layers:  # own storage again (the original layout; the fused tensors are freed)
            attn = layer.self_attn
            assert len({_storage(attn.q_proj.weight), _storage(attn.k_proj.weight), _storage(attn.v_proj.weight)}) == 3
            assert _storage(layer.mlp.gate_proj.weight) != _storage(layer.mlp.up_proj.weight)
            assert "forward" not in layer.mlp.__dict__ and "_kvquant_qkv" not in attn.__dict__
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def test_unfusable_layers_are_left_alone():
    model = make_tiny_llama()

    class MyLinear(nn.Linear):  # e.g. a quantized linear: its own forward must run
        pass

    attn = model.model.layers[0].self_attn
    old = attn.k_proj
    attn.k_proj = MyLinear(old.in_features, old.out_features, bias=False)
    mlp = model.model.layers[1].mlp
    mlp.up_proj.bias = nn.Parameter(torch.zeros(mlp.up_proj.out_features))  # gate without bias, up with one
    n = projections.fuse_projections(model)
    assert n == 2 * 2 - 2
    assert "_kvquant_qkv" not in attn.__dict__ and "_kvquant_gate_up" not in mlp.__dict__
    assert "_kvquant_qkv" in model.model.layers[1].self_attn.__dict__
    projections.unfuse_projections(model)


def test_fused_projections_config_is_validated():
    assert KVQuantConfig(fused_projections=True).fused_projections
    with pytest.raises(KVQuantConfigError, match="fused_projections"):
        KVQuantConfig(fused_projections=1)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_mistral], ids=["llama", "mistral"])
def test_generate_with_fused_projections_keeps_the_tokens(make):
    model = make()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="kvquant", output_scores=True,
              return_dict_in_generate=True)
    plain = model.generate(ids, cache_config={"bits": 4}, **kw)
    assert not getattr(model, "_kvquant_fused_projections", False)
    fused = model.generate(ids, cache_config={"bits": 4, "fused_projections": True, "fused_norms": True}, **kw)
    assert model._kvquant_fused_projections
    assert torch.equal(plain.sequences, fused.sequences)
    for a, b in zip(plain.scores, fused.scores):  # float32 on CPU: the fused GEMV sums in about the same order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    unpatch_model(model)  # undoes the projections too
    assert not model._kvquant_fused_projections
    assert not any("_kvquant_qkv" in m.__dict__ or "_kvquant_gate_up" in m.__dict__ for m in model.modules())


def test_a_fused_model_saves_and_loads_like_the_original(tmp_path):
    from transformers import LlamaForCausalLM

    model = make_tiny_llama()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    projections.fuse_projections(model)
    model.save_pretrained(tmp_path)  # the weights are views of the fused tensors while fused
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).state_dict()
    assert set(loaded) == set(want) and all(torch.equal(loaded[k], want[k]) for k in want)


def test_replaced_weights_drop_the_fusion_with_a_warning():
    """model.to(...) / load_state_dict(assign=True) give the linears new tensors: the stale fused copy must not run."""
    from kvquant_hf.models import patch_model

    model = patch_model(make_tiny_llama())  # as generate leaves it
    other = make_tiny_llama(seed=1)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    projections.fuse_projections(model)
    with torch.no_grad():
        model.load_state_dict(other.state_dict(), assign=True)
        with pytest.warns(RuntimeWarning, match="fusion is dropped"):
            got = model(ids).logits
        torch.testing.assert_close(got, other(ids).logits, rtol=0, atol=0)  # the new weights, not the stale copy
        assert not any("_kvquant_qkv" in m.__dict__ or "_kvquant_gate_up" in m.__dict__ for m in model.modules())
        assert not any("forward" in layer.mlp.__dict__ for layer in model.model.layers)
        projections.fuse_projections(model)
        model.to(torch.float64)
        with pytest.warns(RuntimeWarning, match="fuse_projections"):
            assert model(ids).logits.dtype == torch.float64


def test_generate_after_model_to_still_works_and_kvquant_path_uses_fresh_weights():
    model = make_tiny_llama()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 128, (1, 8), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=4, do_sample=False, cache_implementation="kvquant")
    model.generate(ids, cache_config={"bits": 4, "fused_projections": True}, **kw)
    model.to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="fusion is dropped"):
        out = model.generate(ids, cache_config={"bits": 4}, **kw)
    assert out.shape == (1, 12)


def test_training_takes_the_stock_path_so_gradients_reach_the_weights():
    model = make_tiny_llama()
    projections.fuse_projections(model)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    loss = model(ids, labels=ids).loss
    loss.backward()
    layer = model.model.layers[0]
    for lin in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_modules_placed_by_accelerate_are_not_fused():
    model = make_tiny_llama()
    model.model.layers[0].self_attn._hf_hook = object()  # what accelerate's add_hook_to_module leaves
    model.model.layers[1].mlp.up_proj._hf_hook = object()
    n = projections.fuse_projections(model)
    assert n == 2
    assert "_kvquant_qkv" not in model.model.layers[0].self_attn.__dict__
    assert "_kvquant_gate_up" not in model.model.layers[1].mlp.__dict__
    assert "forward" not in model.model.layers[1].mlp.__dict__
