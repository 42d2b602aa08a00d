"""CPU probe: passkey with nuq3 and Q-Norm on (calibrated mean/std correction of the signposts).

Usage: PYTHONPATH=. python benchmarks/passkey_qnorm_probe.py qnorm 2048 0.25 /tmp/out.json
(args: "qnorm" or "plain", one length, comma-separated depths, JSON path; signposts /work/signposts/smollm2-1pct
or KVQUANT_PROBE_SIGNPOSTS)."""
import os
import sys
import time

import kvquant_hf.evaluation.passkey as pk

QN = sys.argv[1] == "qnorm"
orig = pk._generate
def gen(model, ids, method, new_tokens, signposts, chunk, pad_id):
    if method.startswith("nuq") and QN:
        import torch
        kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad_id,
                  "attention_mask": torch.ones_like(ids)}
        cfg = {"bits": int(method[3:]), "prefill_chunk_size": chunk, "qnorm": True,
               "signposts": pk._loaded_signposts(signposts, int(method[3:]))}
        out = model.generate(ids, cache_implementation="kvquant", cache_config=cfg, **kwargs)
        return out[0, ids.shape[1]:].tolist()
    return orig(model, ids, method, new_tokens, signposts, chunk, pad_id)
pk._generate = gen
sys.argv = ["passkey", "--model", "smollm2", "--lengths", sys.argv[2], "--depths", *sys.argv[3].split(","), "--trials", "10",
            "--methods", "nuq3", "--signposts", os.environ.get("KVQUANT_PROBE_SIGNPOSTS", "/work/signposts/smollm2-1pct"), "--device", "cpu", "--json", sys.argv[4]]
t = time.time()
pk.main()
print("elapsed", time.time() - t)
