"""Shared pytest fixtures: the real SmolLM2 (loaded once per test run) and tiny random Llama models."""

from __future__ import annotations

import os
import sys

import pytest

# Triton kernels are tested in the interpreter on machines without a GPU. The flag is read when triton is
# first imported (transformers imports it), so it must be set here, before anything imports torch/transformers.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

# `pytest` from the repo root without an installed package (python -m pytest adds the root itself)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from kvquant_hf.errors import KVQuantError

#: the kernel modules in import order (each imports only modules before it), for reloading them together
KERNEL_MODULES = ("common", "guard", "quantize_kernels", "quantize", "split_kernel", "decode_kernel", "merge_kernel",
                  "cuda_decode", "decode_attention", "dequantize", "exact_block", "rms_norm", "silu_mul", "window_write")


def interpreted_module(name: str, kernel: str):
    """``kvquant_hf.kernels.<name>`` with its kernels decorated for the Triton interpreter: if ``kernel`` (one of its
    ``@triton.jit`` functions) was decorated without the flag, i.e. the modules were imported earlier, every kernel
    module is reloaded in import order (the launchers hold the kernels of the modules they import)."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction  # (not imported by `import triton` on GPU machines)

    module = importlib.import_module(f"kvquant_hf.kernels.{name}")
    if not isinstance(getattr(module, kernel), InterpretedFunction):
        for dep in KERNEL_MODULES:
            importlib.reload(importlib.import_module(f"kvquant_hf.kernels.{dep}"))
        module = importlib.import_module(f"kvquant_hf.kernels.{name}")
    return module


def force_triton_backend(monkeypatch) -> None:
    """Layers made after this call take the Triton path on CPU tensors (kernels decorated for the interpreter):
    ``resolve_backend`` picks torch off CUDA, so it is replaced for the test. Skips unless ``TRITON_INTERPRET=1``."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter on CPU (TRITON_INTERPRET=1): head_dim 16 takes the torch path on a GPU")
    import importlib

    import kvquant_hf.kernels
    from kvquant_hf import layer as layer_mod

    interpreted_module("exact_block", "_decode_prep_kernel")
    importlib.reload(kvquant_hf.kernels)
    monkeypatch.setattr(layer_mod, "resolve_backend",
                        lambda backend, device, head_dim=None: "torch" if backend == "torch" else "triton")


def interpreted_kernel_modules():
    """``(kvquant_hf.kernels.quantize, kvquant_hf.kernels.decode_attention)`` decorated for the Triton interpreter.

    Call at module level of a kernel test file: it skips that module unless ``TRITON_INTERPRET=1`` was set before
    triton was imported, and reloads the kernel modules if another module imported them without the flag.
    """
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction as interpreted  # (see interpreted_module)

    if os.environ.get("TRITON_INTERPRET") != "1" or not isinstance(triton.language.standard.sum, interpreted):
        # triton reads the flag when it is first imported (this conftest sets it on machines without a GPU)
        pytest.skip("run with TRITON_INTERPRET=1 set before triton is imported (Triton interpreter on CPU)",
                    allow_module_level=True)
    return (interpreted_module("quantize", "quantize_keys_kernel"),
            interpreted_module("decode_attention", "packed_attn_merge_kernel"))


def make_tiny_llama(num_key_value_heads: int = 2, num_hidden_layers: int = 2, seed: int = 0):
    """A tiny random `LlamaForCausalLM` (hidden 64, 4 query heads, head_dim 16, vocab 128), float32, eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def smollm2():
    """`(model, tokenizer)` of the embedded SmolLM2-135M-Instruct (float32, CPU), loaded once per test run.

    Tests must not modify the model in place.
    """
    from kvquant_hf.models.loading import load_model_and_tokenizer

    try:
        return load_model_and_tokenizer("smollm2")
    except KVQuantError as exc:
        pytest.skip(f"embedded SmolLM2 unavailable: {exc}")


@pytest.fixture
def tiny_llama():
    """Tiny random GQA Llama: 2 layers, 4 query heads, 2 kv heads, head_dim 16, vocab 128."""
    return make_tiny_llama(num_key_value_heads=2)


@pytest.fixture
def tiny_llama_mha():
    """Tiny random MHA Llama: 2 layers, 4 query heads, 4 kv heads, head_dim 16, vocab 128."""
    return make_tiny_llama(num_key_value_heads=4)


# --- kvquant cache / generate tests ------------------------------------------------------------------------
def pytest_configure(config):
    config.addinivalue_line("markers", "compat: small subset also run against transformers 5.17 (.ci/compat_517.sh)")


def make_tiny_mistral(sliding_window: int = 8, num_hidden_layers: int = 2, seed: int = 0):
    """A tiny random `MistralForCausalLM` (GQA 4/2 heads, head_dim 16) whose sliding window is `sliding_window`."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        sliding_window=sliding_window,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).to(torch.float32)
    model.eval()
    return model


@pytest.fixture
def tiny_mistral():
    """Tiny random Mistral: 2 layers, 4 query heads, 2 kv heads, head_dim 16, sliding_window 8."""
    return make_tiny_mistral()
