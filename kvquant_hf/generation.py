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
import threading

import torch
from transformers.generation import configuration_utils as _gen_config_utils
from transformers.generation.utils import GenerationMixin

from .cache import KVQuantCache, LazyLayers
from .config import KVQuantConfig
from .errors import KVQuantConfigError, KVQuantNumericalError
from .layer_sink import left_padding_only_error, padded_inside
from .planner_checks import check_generate_tokens

CACHE_IMPLEMENTATION = "kvquant"
_CACHE_KWARGS = ("cache", "past_key_values")
_original_generate = None
#: patching is check-then-set per module: two threads' first generate calls on one model must not both patch
_PATCH_LOCK = threading.Lock()


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
    with _PATCH_LOCK:
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

    with _PATCH_LOCK:
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


@functools.lru_cache(maxsize=None)
def _call_config_class(base: type) -> type:
    def update(self, defaults_only=False, allow_custom_entries=False, **kwargs):
        if defaults_only:  # the model's defaults: its cache request is served by this call's cache object
            kwargs.pop("cache_implementation", None)
            kwargs.pop("cache_config", None)
        return base.update(self, defaults_only=defaults_only, allow_custom_entries=allow_custom_entries, **kwargs)

    return type(base.__name__, (base,), {"update": update, "__module__": base.__module__})


def call_generation_config(generation_config):
    """A copy of a caller's ``GenerationConfig`` for one call with a KVQuant cache object: ``cache_implementation``
    and ``cache_config`` stay unset, also where ``model.generation_config`` (whose unset fields transformers copies
    into the call's config) asks for ``"kvquant"``. Neither the caller's config nor the model's is changed."""
    config = copy.deepcopy(generation_config)
    config.__class__ = _call_config_class(type(generation_config))
    config.cache_implementation = None
    config.cache_config = None
    return config


def _requested_in(generation_config) -> bool:
    return generation_config is not None and getattr(generation_config, "cache_implementation", None) == CACHE_IMPLEMENTATION


def _max_total_tokens(inputs, kwargs: dict) -> int | None:
    """prompt + max_new_tokens when both are known (a capacity hint; growth handles the rest). An empty prompt,
    a max_new_tokens that is not a positive int, or a total beyond int32 positions is a KVQuantConfigError."""
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    if ids is None or not hasattr(ids, "shape") or len(ids.shape) == 0:
        return None
    max_new = kwargs.get("max_new_tokens")
    if max_new is None:  # a passed GenerationConfig(max_new_tokens=...) is a request as well
        max_new = getattr(kwargs.get("generation_config"), "max_new_tokens", None)
    return check_generate_tokens(int(ids.shape[-1]), max_new)


def _expansion(model, kwargs: dict) -> int:
    """Rows per prompt that generate will run: beams or returned sequences."""
    gc = kwargs.get("generation_config") or model.generation_config
    rows = []
    for name in ("num_beams", "num_return_sequences"):
        value = kwargs.get(name, getattr(gc, name, 1))
        if value is None:
            value = 1
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KVQuantConfigError(f"{name}={value!r} must be a positive integer (1 or more).")
        rows.append(value)
    return max(rows)


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
    """``GenerationMixin.generate`` with ``cache_implementation="kvquant"`` support (see the module docstring).

    Shared model state is never changed for the length of a call (other threads may be generating with the same
    model): the request is taken out of the call's own arguments; when ``model.generation_config`` asks for
    ``"kvquant"``, the call's keywords (or a copy of its passed config, :func:`call_generation_config`) keep
    transformers from copying that request into the call; the forward is routed per cache (:class:`RouterTable`).
    """
    inputs = args[0] if args else kwargs.get("inputs")
    if len(args) > 1:  # generation_config passed positionally
        kwargs["generation_config"] = args[1]
        args = args[:1]
    passed_config = kwargs.get("generation_config")
    requested = kwargs.get("cache_implementation") == CACHE_IMPLEMENTATION
    cache_config = kwargs.pop("cache_config", None) if requested else None
    if requested:
        kwargs.pop("cache_implementation")
    model_requests = _requested_in(self.generation_config)
    if _requested_in(passed_config):
        requested = True
        if cache_config is None:
            cache_config = passed_config.cache_config
        kwargs["generation_config"] = call_generation_config(passed_config)
    elif ("cache_implementation" not in kwargs and model_requests and not any(kwargs.get(n) is not None for n in
                                                                             _CACHE_KWARGS)
          and getattr(passed_config, "cache_implementation", None) is None):
        # the model's default (a passed config's unset fields are filled from it); a cache object passed to this
        # call wins over it
        requested = True
        if cache_config is None:
            cache_config = (kwargs.pop("cache_config", None) or getattr(passed_config, "cache_config", None)
                            or self.generation_config.cache_config)

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
    if model_requests:
        # transformers fills the call's unset fields from model.generation_config: "kvquant" would come back
        # next to the cache object. This call's keywords (or its own config) win over the model's config.
        if kwargs.get("generation_config") is None:
            kwargs["cache_implementation"] = None
            kwargs["cache_config"] = None
        elif kwargs["generation_config"] is passed_config:
            kwargs["generation_config"] = call_generation_config(passed_config)

    router = ForwardRouter(self, cache, name, inputs, kwargs)
    router.install()
    try:
        return _original_generate(self, *args, **kwargs)
    finally:
        router.uninstall()


class RouterTable:
    """The model's ``forward`` while one or more ``generate`` calls with a KVQuant cache run on it.

    Each call registers its :class:`ForwardRouter` under its cache; a forward call goes to the router of the cache
    it carries, any other call to the model's own forward. Calls in several threads on one model each keep their
    router, whichever ends first. The last call to end puts the model's own forward back.
    """

    _lock = threading.Lock()

    def __init__(self, model, cache_kw: str):
        self.saved = model.__dict__.get("forward")  # an instance-level forward (an accelerate hook) is kept
        self.original = model.forward
        self.cache_kw = cache_kw
        self.routers: dict[int, ForwardRouter] = {}
        self.__signature__ = inspect.signature(self.original)  # generate inspects forward's parameters

    @classmethod
    def register(cls, router: ForwardRouter):
        """Route ``router.cache``'s forward calls to ``router``; returns the model's own forward."""
        model = router.model
        with cls._lock:
            table = model.__dict__.get("forward")
            if not isinstance(table, RouterTable):
                table = RouterTable(model, router.cache_kw)
                model.forward = table
            if id(router.cache) in table.routers:
                raise KVQuantConfigError(
                    "this KVQuantCache is already in use by another generate call on this model; a cache holds one "
                    "conversation: give each concurrent call its own cache (or cache_implementation='kvquant')."
                )
            table.routers[id(router.cache)] = router
            return table.original

    @classmethod
    def unregister(cls, router: ForwardRouter) -> None:
        model = router.model
        with cls._lock:
            table = model.__dict__.get("forward")
            if not isinstance(table, RouterTable) or table.routers.get(id(router.cache)) is not router:
                return
            del table.routers[id(router.cache)]
            if not table.routers:
                if table.saved is None:
                    model.__dict__.pop("forward", None)
                else:
                    model.forward = table.saved

    def __call__(self, *args, **kw):
        cache = kw.get(self.cache_kw)
        router = self.routers.get(id(cache)) if cache is not None else None
        if router is None or router.cache is not cache:
            return self.original(*args, **kw)
        return router(*args, **kw)


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
        check_left_padded(kwargs.get("attention_mask"))
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
        """Route this call's forwards (those that carry ``self.cache``) here, see :class:`RouterTable`."""
        self.original = RouterTable.register(self)

    def uninstall(self) -> None:
        RouterTable.unregister(self)
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


def check_left_padded(mask) -> None:
    """Refuse a 2D attention mask with padding after a row's first real token (the cache masks left padding
    only), before any work starts."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[-1] < 2:
        return
    inner = padded_inside(mask != 0)
    if bool(inner.any()):
        raise left_padding_only_error([int(r) for r in inner.nonzero()[:, 0]])


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
    "RouterTable",
    "build_kvquant_cache",
    "cache_kwarg_name",
    "call_generation_config",
    "install_generate_hook",
    "kvquant_generate",
    "prepare_model_for_cache",
    "uninstall_generate_hook",
]
