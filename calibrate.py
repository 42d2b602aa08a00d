"""Calibrate KVQuant signposts for a model (thin CLI over `kvquant_hf.calibration`).

Example (the embedded SmolLM2, CPU, a few minutes):

    python calibrate.py --model smollm2 --text-file ../shared/data/wikitext-2/valid.tokens.txt \
        --bits 4 3 2 --outlier-fraction 0.01 --sink-tokens 1 --nsamples 16 --seqlen 2048 \
        --output-dir signposts/smollm2-1pct

writes `signposts/smollm2-1pct/nuq4/`, `nuq3/`, `nuq2/` (format: see `kvquant_hf/signposts.py`).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kvquant_hf.calibration import (
    DEFAULT_KMEANS_MAX_POINTS,
    DEFAULT_MAX_TOKENS_PER_LAYER,
    KEY_TABLES,
    VALUE_TABLES,
    calibrate,
    load_calibration_text,
)
from kvquant_hf.calibration_checks import check_calibration_args, check_device
from kvquant_hf.cli_help import DefaultsHelpFormatter
from kvquant_hf.errors import KVQuantError
from kvquant_hf.signpost_checks import check_output_dir
from kvquant_hf.signposts import FISHER_WEIGHTINGS, save_signposts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model id or folder, a .gguf file, or 'smollm2' (embedded)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model (for GGUF checkpoints)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="UTF-8 calibration text (e.g. ../shared/data/wikitext-2/valid.tokens.txt)")
    src.add_argument("--dataset", choices=["wikitext2"], help="named dataset through `datasets` (needs network)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], choices=[2, 3, 4],
                   help="bit widths to calibrate (one nuqX folder each)")
    p.add_argument("--outlier-fraction", type=float, default=0.01,
                   help="fraction of key/value entries kept exact as outliers (sets the per-channel key thresholds)")
    p.add_argument("--sink-tokens", type=int, default=1,
                   help="first tokens of each window kept exact (left out of the statistics, as in the cache)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows sampled from the text")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--output-dir", required=True, help="writes OUTPUT_DIR/nuq{X}/ for each bit width")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... or 'auto' (accelerate device_map); "
                   "default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model dtype; default float32 on CPU, float16 on GPU")
    p.add_argument("--fisher", default="fisher", choices=list(FISHER_WEIGHTINGS),
                   help="k-means weights: fisher (F), fisher_x2 (F * scale^2) or none")
    p.add_argument("--key-table", default="auto", choices=list(KEY_TABLES),
                   help="key tables only: auto (uniform at 3 and 4 bits, kmeans at 2: what measured best), kmeans "
                   "(the paper's Fisher-weighted k-means), kmeans-pinned (outer entries at the thresholds, interior "
                   "weighted k-means) or uniform")
    p.add_argument("--value-table", default="kmeans", choices=list(VALUE_TABLES),
                   help="value tables: kmeans (reference) or uniform; uniform key and value tables let the CUDA "
                   "decode kernel skip the table lookups (its fastest path)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window sampling, reservoir and k-means")
    p.add_argument("--max-tokens-per-layer", type=int, default=DEFAULT_MAX_TOKENS_PER_LAYER,
                   help="token rows kept per layer (reservoir sample; bounds CPU memory)")
    p.add_argument("--kmeans-max-points", type=int, default=DEFAULT_KMEANS_MAX_POINTS,
                   help="points per k-means fit (subsampled beyond)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model loads: numbers, the device, the output folder."""
    check_calibration_args(
        args.bits, args.outlier_fraction, args.sink_tokens, args.nsamples, args.seqlen, args.seed, args.fisher,
        args.max_tokens_per_layer, args.kmeans_max_points, args.key_table, args.value_table,
    )
    check_device(args.device)
    check_output_dir(args.output_dir, args.bits)


def run(args: argparse.Namespace) -> dict[int, str]:
    """Load the model, calibrate, save; returns `{bits: folder}`."""
    from kvquant_hf.models.loading import load_model_and_tokenizer

    t0 = time.perf_counter()
    check_arguments(args)
    text, source = load_calibration_text(args.text_file, args.dataset)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "float16")
    device_map = "auto" if device == "auto" else None
    model, tokenizer = load_model_and_tokenizer(
        args.model, gguf_file=args.gguf_file, dtype=dtype, device=None if device_map else device, device_map=device_map
    )
    t_load = time.perf_counter() - t0
    result = calibrate(
        model,
        tokenizer,
        text,
        bits=args.bits,
        outlier_fraction=args.outlier_fraction,
        sink_tokens=args.sink_tokens,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        fisher_weighting=args.fisher,
        max_tokens_per_layer=args.max_tokens_per_layer,
        kmeans_max_points=args.kmeans_max_points,
        progress=not args.quiet,
        source_info={**source, "model_arg": args.model},
        key_table=args.key_table,
        value_table=args.value_table,
    )
    folders = {b: save_signposts(sp, args.output_dir) for b, sp in result.items()}

    first = next(iter(result.values()))
    cal = first.metadata["calibration"]
    print(
        f"calibrated {first.num_layers} layers ({first.num_kv_heads} kv heads, head_dim {first.head_dim}) of "
        f"{args.model} on {cal['nsamples']} x {cal['seqlen']} tokens, {cal['tokens_per_layer']} token rows per layer, "
        f"fisher={args.fisher}, outlier_fraction={args.outlier_fraction}"
    )
    print(
        f"time: load {t_load:.1f} s, capture {cal['capture_s']:.1f} s, total calibration {cal['duration_s']:.1f} s, "
        f"wall {time.perf_counter() - t0:.1f} s"
    )
    torch.set_printoptions(precision=4, linewidth=160)
    for b, folder in folders.items():
        layer0 = result[b].layers[0]
        print(f"nuq{b}: {folder}")
        print(f"  layer 0 key signposts:   {[round(float(x), 4) for x in layer0.key_signposts]}")
        print(f"  layer 0 value signposts: {[round(float(x), 4) for x in layer0.value_signposts]}")
    return folders


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except KVQuantError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
