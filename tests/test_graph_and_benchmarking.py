"""The CUDA-graph flag and its error without a GPU, and the fast-fill benchmark helpers (CPU); the CUDA-graph decode
itself is checked in tests/gpu/test_gpu_cuda_graph.py."""

import pytest
import torch

from kvquant_hf import KVQuantConfig
from kvquant_hf.benchmarking import fast_filled_cache, median_ms
from kvquant_hf.errors import BackendUnavailableError, KVQuantConfigError
from kvquant_hf.generation import cache_kwarg_name


def test_cuda_graph_flag_is_validated():
    assert KVQuantConfig(cuda_graph=True).cuda_graph is True
    with pytest.raises(KVQuantConfigError, match="cuda_graph"):
        KVQuantConfig(cuda_graph="yes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_graph_without_gpu_is_a_clear_error(tiny_llama):
    ids = torch.randint(0, 128, (1, 12))
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        tiny_llama.generate(ids, max_new_tokens=3, cache_implementation="kvquant",
                            cache_config={"bits": 4, "cuda_graph": True})


def test_fast_filled_cache_holds_tokens_and_decodes(tiny_llama):
    cache = fast_filled_cache(tiny_llama, batch=2, tokens=300, cache_config={"bits": 3, "sink_tokens": 2})
    assert cache.get_seq_length() == 300
    layer = cache.layers[0]
    assert layer.n_sink == 2 and layer.length == 298 and layer.capacity >= 298
    stats = cache.memory_stats()
    assert stats["seq_length"] == 300 and stats["quantized_tokens"] == 298
    ids = torch.randint(0, 128, (2, 1))
    pos = torch.full((2, 1), 300)
    with torch.inference_mode():
        logits = tiny_llama(input_ids=ids, position_ids=pos, **{cache_kwarg_name(tiny_llama): cache}).logits
    assert torch.isfinite(logits).all()
    assert cache.get_seq_length() == 301
    cache.crop(-1)
    assert cache.get_seq_length() == 300


def test_fast_filled_cache_tables(tiny_llama):
    from kvquant_hf import quant
    from kvquant_hf.kernels.decode_attention import affine_grid

    nf = fast_filled_cache(tiny_llama, batch=1, tokens=40, cache_config={"bits": 4})
    uni = fast_filled_cache(tiny_llama, batch=1, tokens=40, cache_config={"bits": 4}, tables="uniform")
    for a, b in zip(nf.layers, uni.layers):
        assert affine_grid(a.k_lut) is None and affine_grid(a.v_lut) is None  # NormalFloat: the gathered path
        assert torch.equal(b.k_lut, quant.uniform_signposts(4).float()) and affine_grid(b.v_lut) is not None
        assert torch.equal(a.k_codes, b.k_codes)  # same data, other tables
    ids, pos = torch.randint(0, 128, (1, 1)), torch.full((1, 1), 40)
    with torch.inference_mode():
        out = tiny_llama(input_ids=ids, position_ids=pos, **{cache_kwarg_name(tiny_llama): uni}).logits
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="tables"):
        fast_filled_cache(tiny_llama, batch=1, tokens=40, tables="kmeans")


def test_median_ms_on_cpu_is_wall_time():
    calls = []
    ms = median_ms(lambda: calls.append(sum(range(20000))), warmup=1, iters=3, device="cpu")
    assert len(calls) == 4 and 0 < ms < 1000
