"""CUDA-graph decode on a small random Llama: replaying the captured step gives the eager step's logits, and a step
past ``max_steps`` is a clear error."""

import pytest
import torch

import kvquant_hf

pytestmark = pytest.mark.gpu


def test_cuda_graph_decode_equals_eager():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvquant_hf.cuda_graph import CUDAGraphDecoder

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = LlamaForCausalLM(cfg).cuda().float().eval()
    kvquant_hf.patch_model(model)
    prompt = torch.randint(0, 256, (1, 100), device="cuda")
    with torch.inference_mode():
        cache = kvquant_hf.KVQuantCache({"bits": 4}, model_config=cfg)
        logits = model(prompt, past_key_values=cache).logits[:, -1]
        toks, eager = [], []
        for t in range(6):
            nxt = logits.argmax(-1, keepdim=True)
            toks.append(nxt)
            pos = torch.tensor([[100 + t]], device="cuda")
            logits = model(nxt, position_ids=pos, past_key_values=cache).logits[:, -1]
            eager.append(logits)
        cache.crop(-6)
        dec = CUDAGraphDecoder(model, cache, batch_size=1, max_steps=6)
        for t in range(6):
            out = dec.step(toks[t], torch.tensor([[100 + t]], device="cuda"))[:, -1]
            torch.testing.assert_close(out, eager[t], atol=1e-4, rtol=1e-4)
        with pytest.raises(kvquant_hf.KVQuantError, match="max_steps"):
            dec.step(toks[0], torch.tensor([[106]], device="cuda"))
        dec.close()
