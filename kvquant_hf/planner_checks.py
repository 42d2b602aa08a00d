"""Input checks of the memory planner and of ``generate``'s capacity check, and the host's available memory.

Every argument of :func:`kvquant_hf.planner.plan_capacity` is checked here before any arithmetic, so a value of
the wrong type or range is a :class:`~kvquant_hf.errors.KVQuantConfigError` naming the argument and what it
expects, never a ``TypeError`` or ``AttributeError`` from deep inside. Token counts are integers (``bool``,
``float`` and ``str`` are refused); byte amounts may be integers or finite floats (``1.5 * 2**30``).

Positions are stored as int32, so no cache holds more than :data:`MAX_POSITIONS` tokens per sequence.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import torch

from .config import KVQuantConfig
from .errors import KVQuantConfigError

#: largest number of tokens per sequence a KVQuantCache can hold: positions are stored as int32
MAX_POSITIONS = 2**31 - 1
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MODEL_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def is_count(value: Any) -> bool:
    """An integer (Python or NumPy), not ``True``/``False``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(name: str, value: Any, minimum: int = 0, maximum: int | None = None, what: str = "tokens") -> int:
    """``value`` as an int in ``[minimum, maximum]``, or a KVQuantConfigError naming ``name``."""
    if not is_count(value):
        raise KVQuantConfigError(f"{name}={value!r} ({type(value).__name__}) must be an int (a number of {what}).")
    value = int(value)
    if value < minimum:
        raise KVQuantConfigError(f"{name}={value} must be >= {minimum}.")
    if maximum is not None and value > maximum:
        raise KVQuantConfigError(f"{name}={value:,} must be <= {maximum:,}.")
    return value


def check_bytes(name: str, value: Any) -> int:
    """A byte amount: a non-negative int or finite float, as an int."""
    ok = is_count(value) or (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value))
    if not ok:
        raise KVQuantConfigError(f"{name}={value!r} ({type(value).__name__}) must be a number of bytes (an int).")
    if value < 0:
        raise KVQuantConfigError(f"{name}={value!r} must be >= 0 bytes.")
    return int(value)


def check_bool(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        raise KVQuantConfigError(
            f"{name}={value!r} ({type(value).__name__}) must be True or False{' (or None)' if allow_none else ''}."
        )


def check_device(name: str, value: Any) -> str:
    """A device as the planner keys it (``"cuda:0"``, ``"cpu"``): a GPU index, a device string or torch.device."""
    if is_count(value):
        if value < 0:
            raise KVQuantConfigError(f"{name}: GPU index {value} must be >= 0.")
        return f"cuda:{int(value)}"
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, str):
        try:
            dev = torch.device(value)
        except (RuntimeError, ValueError):
            dev = None
        if dev is not None:
            return str(dev)
    raise KVQuantConfigError(
        f"{name}: {value!r} is not a device the planner can place layers on; use 'cuda:0', 'cpu', a GPU index or a "
        "torch.device."
    )


def check_dtype(value: Any) -> torch.dtype | None:
    """None, a torch dtype, or its name (``"bfloat16"``, ``"torch.float16"``) of a dtype a cache can hold."""
    if value is None:
        return None
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or dtype not in CACHE_DTYPES:
        names = ", ".join(str(d) for d in CACHE_DTYPES)
        raise KVQuantConfigError(f"dtype={value!r} is not a model dtype the cache supports; use one of {names}.")
    return dtype


def check_model_config(config: Any, name: str = "model_config") -> None:
    """A transformers decoder config with the fields the planner reads, each a positive int."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    missing = [f for f in _MODEL_FIELDS if not hasattr(text, f)]
    if missing or isinstance(config, (Mapping, str)):
        raise KVQuantConfigError(
            f"{name} must be a transformers config of a decoder model (for example "
            f"AutoConfig.from_pretrained(...)); got {type(config).__name__}"
            + (f" without {', '.join(missing)}." if missing and not isinstance(config, str) else ".")
        )
    for field_name in _MODEL_FIELDS + ("num_key_value_heads", "head_dim"):
        value = getattr(text, field_name, None)
        if value is None and field_name in ("num_key_value_heads", "head_dim"):
            continue
        if not is_count(value) or value < 1:
            raise KVQuantConfigError(f"{name}.{field_name}={value!r} must be a positive int.")


def check_model(model: Any, model_config: Any) -> None:
    if model is None:
        if model_config is None:
            raise KVQuantConfigError("plan_capacity needs a model or a model_config.")
        check_model_config(model_config)
        return
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        hint = ("; to plan from a config, pass it as model_config= (model=None)"
                if hasattr(model, "num_hidden_layers") or hasattr(model, "get_text_config") else
                "; pass a model loaded with AutoModelForCausalLM, or model=None with model_config=")
        raise KVQuantConfigError(
            f"model must be a transformers model (torch.nn.Module), got {type(model).__name__}{hint}."
        )
    check_model_config(model_config if model_config is not None else model.config,
                       "model_config" if model_config is not None else "model.config")


def check_cache_config(cache_config: Any) -> None:
    if cache_config is None or isinstance(cache_config, (dict, KVQuantConfig)) or cache_config == "fp16":
        return
    raise KVQuantConfigError(
        f"cache_config={cache_config!r} is not supported; pass a dict of KVQuantConfig keys (e.g. {{'bits': 2}}), "
        "a KVQuantConfig, None (the defaults) or 'fp16' (a plain fp16/bf16 cache)."
    )


def check_free_memory(free_memory: Any) -> dict[str, int] | int | None:
    """None, one byte amount, or ``{device: bytes}`` with devices that parse; normalized."""
    if free_memory is None:
        return None
    if isinstance(free_memory, Mapping):
        return {check_device("free_memory key", k): check_bytes(f"free_memory[{k!r}]", v)
                for k, v in free_memory.items()}
    if isinstance(free_memory, numbers.Real):
        return check_bytes("free_memory", free_memory)
    raise KVQuantConfigError(
        f"free_memory={free_memory!r} ({type(free_memory).__name__}) must be bytes per device "
        "({'cuda:0': 80 * 2**30}), one number of bytes for a single device, or None (query CUDA)."
    )


def check_device_map(device_map: Any) -> None:
    if device_map is None:
        return
    if isinstance(device_map, (list, tuple)):
        for i, dev in enumerate(device_map):
            check_device(f"device_map[{i}]", dev)
    elif isinstance(device_map, Mapping):
        for key, dev in device_map.items():
            check_device(f"device_map[{key!r}]", dev)
    else:
        raise KVQuantConfigError(
            f"device_map={type(device_map).__name__} is not supported; pass a list of devices per layer or an "
            "accelerate device map dict."
        )


def check_plan_args(model: Any, cache_config: Any, model_config: Any, free_memory: Any, dtype: Any, batch_size: Any,
                    device_map: Any, weights_resident: Any, prompt_tokens: Any, prefill_chunk_size: Any, reserved: Any,
                    headroom_bytes: Any, max_tokens_limit: Any) -> dict[str, Any]:
    """Every argument of ``plan_capacity`` checked; returns the normalized ``free_memory``, ``dtype`` and counts."""
    check_model(model, model_config)
    check_cache_config(cache_config)
    check_device_map(device_map)
    check_bool("weights_resident", weights_resident, allow_none=True)
    check_bool("reserved", reserved)
    out = {
        "free_memory": check_free_memory(free_memory),
        "dtype": check_dtype(dtype),
        "batch_size": check_count("batch_size", batch_size, minimum=1, what="sequences"),
        "headroom_bytes": check_bytes("headroom_bytes", headroom_bytes),
        "max_tokens_limit": check_count("max_tokens_limit", max_tokens_limit, minimum=1),
        "prompt_tokens": None,
        "prefill_chunk_size": None,
    }
    if prompt_tokens is not None:
        if is_count(prompt_tokens) and prompt_tokens == 0:
            raise KVQuantConfigError("prompt_tokens=0: a prompt has at least one token (or pass None for one chunk).")
        out["prompt_tokens"] = check_count("prompt_tokens", prompt_tokens, minimum=1, maximum=MAX_POSITIONS)
    if prefill_chunk_size is not None:
        out["prefill_chunk_size"] = check_count("prefill_chunk_size", prefill_chunk_size, minimum=0)
    return out


def check_generate_tokens(prompt_tokens: int, max_new_tokens: Any) -> int | None:
    """``prompt + max_new_tokens`` of a kvquant ``generate`` call (None when ``max_new_tokens`` is not given).

    An empty prompt, a ``max_new_tokens`` that is not a positive int, or a total beyond int32 positions is a
    KVQuantConfigError (transformers fails on an empty prompt too, with a raw error from inside the model).
    """
    if prompt_tokens == 0:
        raise KVQuantConfigError(
            "the prompt is empty (input_ids has 0 tokens per row): generation needs at least one prompt token to "
            "start from; pass at least the BOS token (tokenizer('', return_tensors='pt') adds it for Llama/Mistral)."
        )
    if max_new_tokens is None:
        return None
    if not is_count(max_new_tokens) or max_new_tokens < 1:
        raise KVQuantConfigError(
            f"max_new_tokens={max_new_tokens!r} ({type(max_new_tokens).__name__}) must be a positive int."
        )
    total = int(prompt_tokens) + int(max_new_tokens)
    if total > MAX_POSITIONS:
        raise KVQuantConfigError(
            f"prompt ({prompt_tokens:,}) + max_new_tokens ({int(max_new_tokens):,}) = {total:,} tokens per sequence "
            f"is more than a KVQuantCache can hold ({MAX_POSITIONS:,}: positions are stored as int32); lower "
            "max_new_tokens."
        )
    return total


def free_host_memory() -> int | None:
    """Bytes of host memory the process can still allocate: the OS's available memory (psutil, else
    ``/proc/meminfo`` MemAvailable, else free pages), capped by a cgroup v2 memory limit; None where unknown."""
    avail = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except (ImportError, OSError, RuntimeError, AttributeError):  # psutil missing or unsupported: ask the OS
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            pass
        if avail is None:
            try:
                avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


__all__ = ["CACHE_DTYPES", "MAX_POSITIONS", "check_bool", "check_bytes", "check_count", "check_dtype",
           "check_generate_tokens", "check_model", "check_model_config", "check_plan_args", "free_host_memory",
           "is_count"]
