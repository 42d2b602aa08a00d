"""Where the real cache and the simulated quantization part ways (SmolLM2, one short window, CPU).

Feeds the same tokens to the simulated cache (one forward) and to ``KVQuantCache`` (token by token), then
compares the stored history of a few layers (real: dequantized from the packed cache and rotated; simulated:
its float history) and shows the worst key element of layer 0 with its calibrated threshold.

Usage: ``python benchmarks/diag_real_vs_sim.py --signposts /work/signposts/smollm2-1pct --bits 2 --tokens 64``
"""

from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch

TEST_TEXT = os.path.normpath(os.path.join(_ROOT, "..", "shared", "data", "wikitext-2", "test.raw.txt"))


def main() -> None:
    import kvquant_hf
    from kvquant_hf.attention import rope_rotate
    from kvquant_hf.evaluation.perplexity import load_token_ids
    from kvquant_hf.models import patch_model
    from kvquant_hf.models.loading import load_model_and_tokenizer
    from kvquant_hf.simulated import build_simulated_cache

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--signposts", required=True, help="folder with nuqX subfolders")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--text-file", default=TEST_TEXT)
    args = ap.parse_args()
    n, bits = args.tokens, args.bits
    model, tok = load_model_and_tokenizer("smollm2")
    patch_model(model)
    ids = load_token_ids(tok, text_file=args.text_file)[:n][None]
    sp = os.path.join(args.signposts, f"nuq{bits}")
    with torch.no_grad():
        sim = build_simulated_cache(model, f"nuq{bits}", signposts=sp)
        ls = model(ids, cache=sim).logits[0]
        real = kvquant_hf.KVQuantCache({"bits": bits, "signposts": sp}, model_config=model.config)
        lr = torch.stack([model(ids[:, t : t + 1], cache=real, position_ids=torch.tensor([[t]])).logits[0, -1]
                          for t in range(n)])
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[:-1].float(), ids[0, 1:], reduction="none")
    ns, nr = nll(ls), nll(lr)
    print(f"mean NLL simulated {ns.mean():.4f} real {nr.mean():.4f}; largest per-token gap "
          f"{(ns - nr).abs().max():.3f} at token {int((ns - nr).abs().argmax())}")
    inv = model.model.rotary_emb.inv_freq.float()
    for li in sorted({0, 1, model.config.num_hidden_layers // 2, model.config.num_hidden_layers - 1}):
        s_l, r_l = sim.layers[li], real.layers[li]
        kr, vr = r_l.dequantized_history()
        length = kr.shape[2]
        kr_rot = rope_rotate(kr, r_l.positions[:, :length].long(), inv, 1.0)
        ks, vs = s_l.keys[:, :, -length:], s_l.values[:, :, -length:]
        tok_diff = (kr_rot - ks).abs().amax(dim=(0, 1, 3))
        print(f"layer {li:2d}: key max diff {(kr_rot - ks).abs().max():.3e} (tokens differing: "
              f"{int((tok_diff > 1e-4).sum())}/{length}), value max diff {(vr - vs).abs().max():.3e}")
        if li == 0:
            d = (kr_rot - ks).abs()[0]
            h, t, c = (int(x) for x in torch.nonzero(d == d.max())[0])
            print(f"  worst layer-0 key: head {h} token {t} channel {c}: thresholds [{r_l.k_lower[h, c]:.6f}, "
                  f"{r_l.k_upper[h, c]:.6f}], real slots {r_l.k_out_idx[0, h, t].tolist()} "
                  f"{[round(v, 6) for v in r_l.k_out_val[0, h, t].float().tolist()]}")


if __name__ == "__main__":
    main()
