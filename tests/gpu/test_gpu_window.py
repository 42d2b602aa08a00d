"""The exact recent window on the GPU: the Triton path equals the torch path, and CUDA-graph decode equals eager
decode, with the ring full at capture and still filling (a window longer than the prompt)."""

import pytest
import torch

import kvquant_hf

pytestmark = pytest.mark.gpu

PROMPT = 100


def tiny_model(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda().to(dtype).eval()
    kvquant_hf.patch_model(model)
    return model


def eager_decode(model, cache, prompt, steps):
    """Greedy tokens and last-position logits of ``steps`` eager decode steps after the prompt."""
    logits = model(prompt, past_key_values=cache).logits[:, -1]
    toks, outs = [], []
    for t in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        toks.append(nxt)
        logits = model(nxt, position_ids=torch.tensor([[PROMPT + t]], device="cuda"), past_key_values=cache).logits
        logits = logits[:, -1]
        outs.append(logits.float())
    return toks, outs


@pytest.mark.parametrize("window", [16, 200])
def test_triton_path_with_a_window_equals_the_torch_path(window):
    model = tiny_model(torch.float32)
    prompt = torch.randint(0, 256, (1, PROMPT), device="cuda")
    outs = {}
    with torch.inference_mode():
        for backend in ("torch", "triton"):
            cache = kvquant_hf.KVQuantCache({"bits": 4, "recent_window": window, "backend": backend},
                                            model_config=model.config)
            outs[backend] = eager_decode(model, cache, prompt, 24)[1]
            assert cache.layers[0].backend == backend
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [16, 200])
def test_cuda_graph_decode_with_a_window_equals_eager(window, dtype):
    from kvquant_hf.cuda_graph import CUDAGraphDecoder

    model = tiny_model(dtype)
    prompt = torch.randint(0, 256, (1, PROMPT), device="cuda")
    steps = 24
    with torch.inference_mode():
        cache = kvquant_hf.KVQuantCache({"bits": 4, "recent_window": window}, model_config=model.config)
        toks, eager = eager_decode(model, cache, prompt, steps)
        graph_cache = kvquant_hf.KVQuantCache({"bits": 4, "recent_window": window}, model_config=model.config)
        model(prompt, past_key_values=graph_cache)
        dec = CUDAGraphDecoder(model, graph_cache, batch_size=1, max_steps=steps)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for t in range(steps):
            out = dec.step(toks[t], torch.tensor([[PROMPT + t]], device="cuda"))[:, -1].float()
            torch.testing.assert_close(out, eager[t], atol=tol, rtol=tol)
        dec.close()
        # back to eager after the graph: the ring the graph wrote is the one eager decoding reads
        nxt = eager[-1].argmax(-1, keepdim=True)
        pos = torch.tensor([[PROMPT + steps]], device="cuda")
        a = model(nxt, position_ids=pos, past_key_values=cache).logits[:, -1].float()
        b = model(nxt, position_ids=pos, past_key_values=graph_cache).logits[:, -1].float()
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
