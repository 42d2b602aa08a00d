"""How close to a tie the first answer tokens of each passkey cell are (SmolLM2, trials 0..N-1 of every cell).

The passkey cells are nearly all-or-nothing: the ten trials of a cell share the haystack and differ only in the key,
and a miss is the model starting a phrase instead of the digits. This prints, per (length, depth, trial), the fp16 model's
first answer tokens and their smallest margin (top-1 minus top-2 logit), and for each cache setting where its answer
first departs from fp16's and the smallest margin of fp16's tokens while the two agree (negative: another token
wins there). Small fp16 margins mark the cells where a 3-bit key error can flip the answer.

Usage (H200, after the SmolLM2 environment of benchmarks/smollm2_gpu_env.sh):
``python benchmarks/passkey_margins.py --setting nuq3=DIR [--setting nuq3-pinned=DIR2 ...]``
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import md_table, write_results

from kvquant_hf.evaluation.passkey import _loaded_signposts, build_prompt, load_model_and_tokenizer


def answer_logits(model, ids: torch.Tensor, bits: int | None, signposts: str | None, chunk: int, steps: int
                  ) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and float32 logits of the first ``steps`` answer tokens (fp16 model when ``bits`` is None)."""
    kw = {"max_new_tokens": steps, "do_sample": False, "attention_mask": torch.ones_like(ids), "output_logits": True,
          "return_dict_in_generate": True, "pad_token_id": 0}
    if bits is not None:
        cfg = {"bits": bits, "prefill_chunk_size": chunk, "signposts": _loaded_signposts(signposts, bits)}
        kw.update(cache_implementation="kvquant", cache_config=cfg)
    with torch.inference_mode():
        out = model.generate(ids, **kw)
    return out.sequences[0, ids.shape[1]:].tolist(), [lg[0].float() for lg in out.logits]


def margin(logits: torch.Tensor, token: int) -> float:
    """logit of ``token`` minus the best other token's."""
    other = logits.clone()
    other[token] = float("-inf")
    return float(logits[token] - other.max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", action="append", required=True, metavar="NAME=DIR",
                    help="a cache setting: nuqB name (bits from its digits after 'nuq') and its signpost folder")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--depths", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4, help="answer tokens compared")
    ap.add_argument("--trials", type=int, default=1, help="trials per cell (the keys of run_passkey's trials 0..N-1)")
    ap.add_argument("--name", default="passkey_margins_smollm2")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    settings = [s.split("=", 1) for s in args.setting]
    model, tok = load_model_and_tokenizer("smollm2", dtype=torch.float32, device=args.device)
    rows = []
    for length in args.lengths:
        for depth, trial in [(d, t) for d in args.depths for t in range(args.trials)]:
            key = str(random.Random(f"0-{length}-{depth}-{trial}").randint(10000, 99999))  # as run_passkey
            ids = torch.tensor([build_prompt(tok, length, depth, key, 8)], device=args.device)
            ref_toks, ref_lg = answer_logits(model, ids, None, None, args.chunk, args.steps)
            m = [margin(lg, t) for lg, t in zip(ref_lg, ref_toks)]
            i = min(range(len(m)), key=m.__getitem__)
            row = {"length": length, "depth": depth, "trial": trial, "fp16 answer": repr(tok.decode(ref_toks)),
                   "fp16 min margin (step)": f"{m[i]:.3f} ({i + 1})"}
            for name, folder in settings:
                toks, lgs = answer_logits(model, ids, int(name[3:4]), folder, args.chunk, args.steps)
                div = next((j for j, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), None)
                upto = len(ref_toks) if div is None else div + 1  # margins of fp16's tokens while the prefixes agree
                mm = min(margin(lgs[j], ref_toks[j]) for j in range(upto))
                row[f"{name} min margin"] = round(mm, 3)
                row[f"{name}"] = "same" if div is None else f"step {div + 1}: {tok.decode(toks[div:])!r}"
            print(row, flush=True)
            rows.append(row)
            write(args, settings, rows)  # after every prompt: a cut-off run keeps what it measured


def write(args, settings, rows) -> None:
    cols = list(rows[0])
    md = "\n".join([
        "# Answer-token margins of the passkey cells (SmolLM2-135M-Instruct, float32)", "",
        "Margin = logit of the fp16 model's answer token minus the best other token, smallest over the first "
        f"{args.steps} answer tokens (for a cache setting: up to where its answer departs from fp16's; negative there)."
        " Settings: "
        + ", ".join(f"`{n}` = `{d}`" for n, d in settings) + ".", "",
        f"Command: `python benchmarks/passkey_margins.py --trials {args.trials} "
        f"{' '.join('--setting ' + s for s in args.setting)}`.", "",
        md_table(rows, cols), ""])
    write_results(args.name, rows, md, repo_and_out=True)


if __name__ == "__main__":
    main()
