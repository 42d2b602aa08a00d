"""``model.generate(..., cache_implementation="kvquant")``: the generate hook.

transformers 5.x accepts only its built-in ``cache_implementation`` names (``GenerationConfig.validate``
raises on others) and has no registry for new ones. :func:`install_generate_hook` (run by ``import
kvquant_hf``) does two things:

1. it adds ``"kvquant"`` to ``transformers.generation.configuration_utils.ALL_CACHE_IMPLEMENTATIONS`` so a
   ``GenerationConfig(cache_implementation="kvquant", cache_config={...})`` can be built, saved and loaded;
2. it wraps ``GenerationMixin.generate``: when ``"kvquant"`` is requested (as a keyword, in the passed
   ``generation_config`` or in ``model.generation_config``), or a :class:`~kvquant_hf.cache.KVQuantCache` is
   passed, the wrapper patches the model (:func:`kvquant_hf.models.patch_model`), builds the cache from
   ``cache_config`` (validated by :meth:`KVQuantConfig.from_dict`; signposts loaded and checked against the
   model), and hands it to the original ``generate`` as a user cache, under the argument name of the installed
   transformers (``cache`` from 5.24, ``past_key_values`` before). Everything else (greedy, sampling, beam
   search, streamers, assisted decoding, ``return_dict_in_generate``) is transformers' own code.

Example:

```python
>>> import kvquant_hf  # installs the hook
>>> out = model.generate(ids, max_new_tokens=32, cache_implementation="kvquant",
...                      cache_config={"signposts": "signposts/llama", "bits": 4})
```
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from transformers.generation import configuration_utils as _gen_config_utils
from transformers.generation.utils import GenerationMixin

from .cache import KVQuantCache, LazyLayers
from .config import KVQuantConfig
from .errors import KVQuantConfigError, KVQuantNumericalError

CACHE_IMPLEMENTATION = "kvquant"
_CACHE_KWARGS = ("cache", "past_key_values")
_original_generate = None


def cache_kwarg_name(model) -> str:
    """The name transformers' generate and forward use for the cache: ``cache`` (>= 5.24) or ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def build_kvquant_cache(model, cache_config: dict | KVQuantConfig | None = None) -> KVQuantCache:
    """Patch ``model`` and build a :class:`KVQuantCache` for it from a ``cache_config`` dict.

    Args:
        model: a Llama/Mistral ``PreTrainedModel`` (other architectures raise ``UnsupportedModelError`` listing the
            supported model types).
        cache_config (`dict` or `KVQuantConfig`, *optional*): :class:`KVQuantConfig` keys; ``signposts`` may be a
            folder written by ``calibrate.py`` or a loaded ``Signposts``. Unknown keys raise an error listing the
            allowed ones.

    Returns:
        `KVQuantCache`: empty, one layer per decoder layer, signposts validated against ``model``.
    """
    from .models import patch_model

    config = KVQuantConfig.from_dict(dict(cache_config) if isinstance(cache_config, dict) else (cache_config or {}))
    patch_model(model)
    _apply_fusions(model, config)
    return KVQuantCache(config, model_config=model.config)


def _apply_fusions(model, config: KVQuantConfig) -> None:
    """``fused_norms=True``: one Triton kernel per RMSNorm (:mod:`kvquant_hf.models.norms`);
    ``fused_projections=True``: one GEMV for q/k/v and one for gate/up (:mod:`kvquant_hf.models.projections`)."""
    if config.fused_norms:
        from .models.norms import fuse_rms_norms

        fuse_rms_norms(model)
    if config.fused_projections:
        from .models.projections import fuse_projections

        fuse_projections(model)


def prepare_model_for_cache(model, cache: KVQuantCache) -> None:
    """Patch ``model`` for a user-built ``KVQuantCache`` and check that the cache fits it."""
    from .models import patch_model

    patch_model(model)
    _apply_fusions(model, cache.config)
    text_config = model.config.get_text_config(decoder=True)
    n_layers = text_config.num_hidden_layers
    sp = cache.key_signposts
    if sp is not None:
        from .signposts import validate_signposts

        validate_signposts(sp, model, cache.config.key_bits)
        if cache.value_signposts is not sp:
            validate_signposts(cache.value_signposts, model, cache.config.value_bits)
    if not isinstance(cache.layers, LazyLayers) and len(cache.layers) != n_layers:
        raise KVQuantConfigError(
            f"the KVQuantCache has {len(cache.layers)} layers but the model has {n_layers}; build it with "
            "KVQuantCache(config, model_config=model.config)."
        )


def _requested_in(generation_config) -> bool:
    return generation_config is not None and getattr(generation_config, "cache_implementation", None) == CACHE_IMPLEMENTATION


def _max_total_tokens(inputs, kwargs: dict) -> int | None:
    """prompt + max_new_tokens when both are known (a capacity hint; growth handles the rest)."""
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    max_new = kwargs.get("max_new_tokens")
    if ids is None or max_new is None or not hasattr(ids, "shape"):
        return None
    return int(ids.shape[-1]) + int(max_new)


def _expansion(model, kwargs: dict) -> int:
    """Rows per prompt that generate will run: beams or returned sequences."""
    gc = kwargs.get("generation_config") or model.generation_config
    beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
    returned = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1
    return max(int(beams), int(returned))


def _check_capacity(model, cache: KVQuantCache, total: int, inputs, kwargs: dict) -> None:
    """Refuse (``CapacityError``) a request whose cache cannot fit in the free device memory, before allocating.

    Only devices whose free memory can be queried (CUDA) are checked; see :func:`kvquant_hf.planner.check_request`.
    """
    from .planner import check_request

    if not cache.config.capacity_check:
        return
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    batch = int(ids.shape[0]) * _expansion(model, kwargs)
    check_request(model, cache.config, total, batch, prompt_tokens=int(ids.shape[-1]))


def kvquant_generate(self, *args, **kwargs):
    """``GenerationMixin.generate`` with ``cache_implementation="kvquant"`` support (see the module docstring)."""
    inputs = args[0] if args else kwargs.get("inputs")
    if len(args) > 1:  # generation_config passed positionally
        kwargs["generation_config"] = args[1]
        args = args[:1]
    passed_config = kwargs.get("generation_config")
    requested = kwargs.get("cache_implementation") == CACHE_IMPLEMENTATION
    restore_model_config = None
    cache_config = kwargs.pop("cache_config", None) if requested else None
    if requested:
        kwargs.pop("cache_implementation")
    if _requested_in(passed_config):
        requested = True
        if cache_config is None:
            cache_config = passed_config.cache_config
        passed_config = copy.deepcopy(passed_config)
        passed_config.cache_implementation = None
        passed_config.cache_config = None
        kwargs["generation_config"] = passed_config
    elif passed_config is None and "cache_implementation" not in kwargs and _requested_in(self.generation_config):
        requested = True
        if cache_config is None:
            cache_config = kwargs.pop("cache_config", None) or self.generation_config.cache_config
        restore_model_config = (self.generation_config.cache_implementation, self.generation_config.cache_config)

    user_caches = {name: kwargs[name] for name in _CACHE_KWARGS if kwargs.get(name) is not None}
    kvquant_user = {n: c for n, c in user_caches.items() if isinstance(c, KVQuantCache)}
    if not requested and not kvquant_user:
        return _original_generate(self, *args, **kwargs)

    name = cache_kwarg_name(self)
    if requested:
        if user_caches:
            raise KVQuantConfigError(
                f"generate got both cache_implementation='kvquant' and a cache object ({', '.join(user_caches)}=); "
                "pass only one: the cache object, or cache_implementation with cache_config."
            )
        if kwargs.get("use_cache") is False:
            raise KVQuantConfigError("cache_implementation='kvquant' needs use_cache=True (or leave use_cache unset).")
        cache = build_kvquant_cache(self, cache_config)
        total = _max_total_tokens(inputs, kwargs)
        if total is not None:
            _check_capacity(self, cache, total, inputs, kwargs)
            cache.reserve(total)
    else:
        if len(kvquant_user) > 1 or len(user_caches) > 1:
            raise KVQuantConfigError("pass the cache once: either cache= or past_key_values=, not both.")
        cache = next(iter(kvquant_user.values()))
        prepare_model_for_cache(self, cache)
        total = _max_total_tokens(inputs, kwargs)
        if total is not None and cache.get_seq_length() == 0:
            _check_capacity(self, cache, total, inputs, kwargs)
    for n in _CACHE_KWARGS:
        kwargs.pop(n, None)
    kwargs[name] = cache

    router = ForwardRouter(self, cache, name, inputs, kwargs)
    if restore_model_config is not None:
        self.generation_config.cache_implementation = None
        self.generation_config.cache_config = None
    try:
        router.install()
        return _original_generate(self, *args, **kwargs)
    finally:
        router.uninstall()
        if restore_model_config is not None:
            self.generation_config.cache_implementation, self.generation_config.cache_config = restore_model_config


class ForwardRouter:
    """During one ``generate`` call, route the model's forward for the KVQuant cache.

    * **Chunked prefill**: a call with more than ``config.prefill_chunk_size`` new tokens runs chunk by chunk;
      each chunk attends to the packed history of the earlier chunks (through the kernels on CUDA) and to itself
      exactly, then is packed, so the whole prompt's fp K/V never exists at once. The last chunk's output is
      returned (``generate`` reads the last position's logits).
    * **CUDA-graph decode** (``config.cuda_graph``): the first single-token step after the prefill captures a
      :class:`~kvquant_hf.cuda_graph.CUDAGraphDecoder`; later steps replay it.

    Calls with another cache, ``inputs_embeds`` or a 4D mask run the original forward unchanged (chunking
    them would need a mask per chunk).
    """

    def __init__(self, model, cache: KVQuantCache, cache_kw: str, inputs, kwargs: dict):
        self.model, self.cache, self.cache_kw = model, cache, cache_kw
        self.chunk = cache.config.prefill_chunk_size
        self.graph = cache.config.cuda_graph
        self.decoder = None
        if self.graph:
            from .errors import BackendUnavailableError

            if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
                raise BackendUnavailableError("cache_config['cuda_graph']=True needs the model on a CUDA GPU.")
            if len({p.device for p in model.parameters()}) > 1:
                raise KVQuantConfigError(
                    "cuda_graph=True captures one GPU's work; this model is spread over several devices "
                    "(device_map). Turn cuda_graph off (each layer's cache and kernels already run on its device)."
                )
            ids = inputs if inputs is not None else kwargs.get("input_ids")
            if ids is None or kwargs.get("max_new_tokens") is None:
                raise KVQuantConfigError("cuda_graph=True needs input_ids and max_new_tokens (to size the graph).")
            mask = kwargs.get("attention_mask")
            if mask is not None and not bool(mask.all()):
                raise KVQuantConfigError(
                    "cuda_graph=True does not support padded batches (the attention mask has zeros); "
                    "turn cuda_graph off for left-padded prompts."
                )
            if int(kwargs.get("num_beams", 1) or 1) != 1:
                raise KVQuantConfigError("cuda_graph=True supports greedy and sampling, not beam search.")
            self.max_steps = int(kwargs["max_new_tokens"])

    def install(self) -> None:
        self.original = self.model.forward
        self.__signature__ = inspect.signature(self.original)  # generate inspects forward's parameters
        self.model.forward = self

    def uninstall(self) -> None:
        self.model.__dict__.pop("forward", None)
        if self.decoder is not None:
            self.decoder.close()

    def __call__(self, *args, **kw):
        ids = kw.get("input_ids", args[0] if args else None)
        if ids is None or kw.get(self.cache_kw) is not self.cache or kw.get("inputs_embeds") is not None:
            return self.original(*args, **kw)
        if args:
            kw["input_ids"] = ids
            args = args[1:]
        mask = kw.get("attention_mask")
        if self.chunk and ids.shape[1] > self.chunk and (mask is None or mask.dim() == 2) and not args:
            return self.chunked_prefill(ids, kw)
        if self.graph and ids.shape[1] == 1 and self.cache.get_seq_length() > 0:
            return self._graph_step(ids, kw)
        return self.original(*args, **kw)

    def chunked_prefill(self, ids: torch.Tensor, kw: dict):
        b, n = ids.shape
        past = self.cache.get_seq_length()
        pos, mask, cache_position = kw.get("position_ids"), kw.get("attention_mask"), kw.get("cache_position")
        out = None
        try:
            for s in range(0, n, self.chunk):
                e = min(n, s + self.chunk)
                ckw = dict(kw, input_ids=ids[:, s:e])
                ckw["position_ids"] = (pos[:, s:e] if pos is not None else
                                       torch.arange(past + s, past + e, device=ids.device).expand(b, e - s))
                if past + s == 0:
                    if mask is not None:  # the first call: the cache reads left padding from its diagonal
                        ckw["attention_mask"] = mask[:, :e]
                else:
                    ckw["attention_mask"] = self._block_mask(mask, past + s, past + e, ckw["position_ids"])
                if cache_position is not None:
                    ckw["cache_position"] = cache_position[s:e]
                out = self.original(**ckw)
        except KVQuantNumericalError:
            # the failing chunk was rolled back by the cache; the earlier chunks of this call go too
            for layer in self.cache.layers:
                if layer.is_initialized and layer.get_seq_length() > past:
                    layer.rollback(past)
            raise
        return out

    def _block_mask(self, mask, start: int, end: int, positions: torch.Tensor) -> torch.Tensor:
        """``[B, 1, c, c]`` bool mask of one later chunk over its own tokens only: causal, its padding columns,
        the sliding window. The cache attends to the earlier tokens without reading mask columns, and a mask
        sized by transformers would span the whole context (``c x (held + c)``: 12 GiB at 3M tokens)."""
        c, b, dev = end - start, positions.shape[0], positions.device
        visible = torch.ones(c, c, dtype=torch.bool, device=dev).tril().expand(b, c, c)
        if mask is not None:
            visible = visible & mask[:, start:end].to(dev, torch.bool)[:, None, :]
        text = self.model.config.get_text_config(decoder=True) if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        window = getattr(text, "sliding_window", None)
        if window and (getattr(text, "use_sliding_window", True) is not False):
            visible = visible & (positions[:, :, None] - positions[:, None, :] < int(window))
        return visible[:, None]

    def _graph_step(self, ids: torch.Tensor, kw: dict):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        pos = kw.get("position_ids")
        if pos is None:
            pos = torch.full((ids.shape[0], 1), self.cache.get_seq_length(), dtype=torch.long, device=ids.device)
        if self.decoder is None:
            from .cuda_graph import CUDAGraphDecoder

            self.decoder = CUDAGraphDecoder(self.model, self.cache, ids.shape[0], self.max_steps,
                                            forward=self.original)
        logits = self.decoder.step(ids, pos).clone()
        return CausalLMOutputWithPast(logits=logits, past_key_values=self.cache)


def _register_cache_name() -> None:
    """Let ``GenerationConfig.validate`` accept ``cache_implementation="kvquant"``."""
    names = getattr(_gen_config_utils, "ALL_CACHE_IMPLEMENTATIONS", None)
    if isinstance(names, tuple) and CACHE_IMPLEMENTATION not in names:
        _gen_config_utils.ALL_CACHE_IMPLEMENTATIONS = names + (CACHE_IMPLEMENTATION,)


def install_generate_hook() -> None:
    """Make ``generate(cache_implementation="kvquant")`` work (idempotent; run by ``import kvquant_hf``)."""
    global _original_generate
    current = GenerationMixin.generate
    if getattr(current, "_kvquant_hook", False):
        return
    _original_generate = current

    @functools.wraps(current)
    def generate(self, *args, **kwargs):
        return kvquant_generate(self, *args, **kwargs)

    generate._kvquant_hook = True
    GenerationMixin.generate = generate
    _register_cache_name()


def uninstall_generate_hook() -> None:
    """Restore the original ``GenerationMixin.generate`` (the ``"kvquant"`` name stays registered)."""
    if _original_generate is not None and getattr(GenerationMixin.generate, "_kvquant_hook", False):
        GenerationMixin.generate = _original_generate


__all__ = [
    "CACHE_IMPLEMENTATION",
    "ForwardRouter",
    "build_kvquant_cache",
    "cache_kwarg_name",
    "install_generate_hook",
    "kvquant_generate",
    "prepare_model_for_cache",
    "uninstall_generate_hook",
]
