# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""Loading, saving, initialisation and construction from stock, shared by every SafeLlava base.

- [`SafetyPreTrainedMixin`] sits in front of the base's stock `PreTrainedModel` (`SafeLlavaPreTrainedModel`, ...): it
  reads weights from safetensors only, marks a model untrained when its checkpoint lacks a weight the verdict depends
  on, names the config field behind a safety shape mismatch, initialises the safety tokens, ships the pipeline with
  `save_pretrained`, and keeps the policy beside the model (`safety_policy`, `tokenize_safety_texts`). Its
  `from_verdict_checkpoint` builds the *verdict model*: the model class with only the parts a verdict reads holding
  weights (`verdict_parts`), the rest on `meta` (what a gate in front of an engine serving the language model needs).
- [`safety_checkpoint_mapping`]: the checkpoint key renamings, which depend on the config (no rule for parameters the
  config does not create).

Internal transformers APIs used here, each pinned by a canary test (`tests/test_transformers_canaries.py`):
`PreTrainedModel._load_pretrained_model` (the one place that sees every weight file before it is opened) and the
conversion-mapping registry (`register_checkpoint_conversion_mapping`, `WeightRenaming`). The verdict model renames
checkpoint keys as `from_pretrained` does (`get_model_conversion_mapping`, `rename_source_key`) and flags the tensors
it loaded `_is_hf_initialized` (as `from_pretrained` flags loaded tensors) before the model's own initialisation
computes the non-persistent buffers; `tests/test_serve_gate*.py` compare every tensor it holds with the full model's.

This file is remote code: it imports only torch, transformers and its sibling files.
"""

import copy

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig, GenerationMixin
from transformers import initialization as init
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    get_model_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.utils import logging

from .policy_safe_llava import SafetyPolicy, generation_config_with_threshold
from .safety_module_safe_llava import SAFETY_PARAMETER_PREFIXES, SafeLlavaSafetyModule, shape_field


logger = logging.get_logger(__name__)

# Weights the verdict depends on: a checkpoint lacking any of them cannot be a trained safety classifier.
VERDICT_PATH_PREFIXES = (*SAFETY_PARAMETER_PREFIXES, "model.vision_tower.", "model.language_model.embed_tokens.")
# Where a base keeps its vision tower (a class attribute `safety_vision_tower_prefix` overrides it; Qwen2.5-VL:
# "model.visual.").
DEFAULT_VISION_TOWER_PREFIX = "model.vision_tower."
# On-disk (flat) name -> in-memory name of the safety parameters. SafeLlava has always saved the flat names; the head's
# projections were renamed in memory so that language-model LoRA targets (`q_proj`, ...) do not match them.
_FLAT_SAFETY_NAMES = {
    r"^model\.safety_projector\.": "model.safety_module.projector.",
    r"^model\.safety_tokens": "model.safety_module.tokens",
    r"^model\.safety_head\.q_proj\.": "model.safety_module.head.query_projection.",
    r"^model\.safety_head\.k_proj\.": "model.safety_module.head.key_projection.",
    r"^model\.safety_head\.v_proj\.": "model.safety_module.head.value_projection.",
    r"^model\.safety_head\.o_proj\.": "model.safety_module.head.output_projection.",
    r"^model\.safety_head\.level_classifier\.": "model.safety_module.head.level_classifier.",
    r"^model\.safety_head\.category_classifier\.": "model.safety_module.head.category_classifier.",
}
_FLAT_LLM_TOKENS = (r"^model\.llm_safety_tokens", "model.safety_module.llm_tokens")
_LOAD_KWARGS = ("dtype", "device_map", "revision", "cache_dir", "local_files_only", "token", "attn_implementation")
_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token")


def safety_checkpoint_mapping(
    config, stock_model_type: str, stock_class_name: str | None = None, headless: bool = False
) -> list:
    """
    The checkpoint renamings of a SafeLlava class: the stock base's own (legacy llava-hf key names, ...; registered by
    stock class name, which transformers prefers, or by `model_type`), then the flat safety names. A rule exists only
    for parameters this config creates (no LLM safety tokens rule in head-only mode), so that every rule matches a
    key, both when loading and, reversed, when saving.
    The generation class's rules name its keys (`model.safety_projector.*`); a headless class's (`headless=True`) name
    its own, without the prefix ([`headless_safety_renamings`]), so that it saves the flat names as stock's headless
    classes save theirs. A headless class loading a generation checkpoint gets the generation class's rules as well
    (`SafetyPreTrainedMixin.from_pretrained`).
    """
    by_class = get_checkpoint_conversion_mapping(stock_class_name) if stock_class_name else None
    stock = [_sparing_safety_keys(rule) for rule in by_class or get_checkpoint_conversion_mapping(stock_model_type) or []]
    if headless:
        return [*stock, *headless_safety_renamings(config)]
    return [*stock, *(WeightRenaming(source_patterns=s, target_patterns=t) for s, t in _flat_names(config).items())]


def headless_safety_renamings(config) -> list:
    """The flat safety names as a headless class's keys: `safety_projector.*` <-> `safety_module.projector.*` (the
    generation class's rules without the `model.` prefix)."""
    return [
        WeightRenaming(source_patterns=source.replace(r"^model\.", "^", 1), target_patterns=target.removeprefix("model."))
        for source, target in _flat_names(config).items()
    ]


def _flat_names(config) -> dict:
    """On-disk (flat) name pattern -> in-memory name of the safety parameters `config` creates."""
    renamings = dict(_FLAT_SAFETY_NAMES)
    if config.num_llm_safety_tokens > 0:
        renamings[_FLAT_LLM_TOKENS[0]] = _FLAT_LLM_TOKENS[1]
    return renamings


def _sparing_safety_keys(rule):
    """A stock renaming that would also move SafeLlava's own keys (Qwen2.5-VL's `^model(?!...)` -> `model.language_model`
    matches `model.safety_tokens`), kept off them by a leading negative lookahead; every other rule unchanged."""
    if not isinstance(rule, WeightRenaming) or not _moves_a_safety_key(rule):
        return rule
    sources = [f"^{_NOT_SAFETY_KEY}{p[1:]}" if p.startswith("^") else p for p in rule._original_source_patterns]
    return WeightRenaming(source_patterns=sources, target_patterns=list(rule._original_target_patterns))


def _moves_a_safety_key(rule) -> bool:
    probe = copy.deepcopy(rule)  # renaming marks a rule used
    return any(probe.rename_source_key(key)[0] != key for key in _SAFETY_KEYS)


# SafeLlava's keys, as saved (flat) and in memory: no stock renaming may move them.
_SAFETY_KEYS = ("model.safety_tokens", "model.safety_projector.x", "model.llm_safety_tokens", "model.safety_module.tokens")
_NOT_SAFETY_KEY = r"(?!model\.(?:safety_|llm_safety_tokens))"


def verdict_parts(model) -> dict[str, str]:
    """The parts of `model` a verdict reads, by name, as checkpoint prefixes: the safety module, the base's vision
    tower (`safety_vision_tower_prefix`, default `model.vision_tower.`) and the input embeddings."""
    return {
        "safety_module": SAFETY_PARAMETER_PREFIXES[0],
        "vision_tower": getattr(model, "safety_vision_tower_prefix", DEFAULT_VISION_TOWER_PREFIX),
        "embed_tokens": "model.language_model.embed_tokens.",
    }


def verdict_path_prefixes(model) -> tuple[str, ...]:
    """`VERDICT_PATH_PREFIXES` of `model`'s base: what `verdict_parts` names."""
    return tuple(verdict_parts(model).values())


def safetensors_only(load_kwargs: dict) -> dict:
    """`from_pretrained` kwargs that read weights from safetensors files only, never from a pickle."""
    if load_kwargs.get("use_safetensors") is False or load_kwargs.get("weights_only") is False:
        raise ValueError(
            "SafeLlava loads weights from safetensors files only: use_safetensors=False and weights_only=False "
            "(pickle checkpoints) are refused. Convert the checkpoint to safetensors in a trusted environment."
        )
    return {**load_kwargs, "use_safetensors": True}


class SafetyPreTrainedMixin:
    """Put in front of a base's stock `PreTrainedModel`: loading, saving and initialisation of every SafeLlava class.

    The headless and the ForConditionalGeneration class of a base set `stock_class` (e.g. `LlavaModel`,
    `LlavaForConditionalGeneration`): it names the stock conversion mapping their own extends (and, for the latter,
    the stock checkpoints `from_base` accepts)."""

    stock_class = None

    def post_init(self):
        # The mapping depends on the config, so it is registered for this class when a model is built (transformers
        # looks it up by class name when loading, and when saving a model that was not loaded).
        if self.stock_class is not None:
            stock = self.stock_class
            headless = _is_headless(type(self))
            mapping = safety_checkpoint_mapping(self.config, stock.config_class.model_type, stock.__name__, headless)
            register_checkpoint_conversion_mapping(type(self).__name__, mapping, overwrite=True)
        super().post_init()

    @classmethod
    def is_custom_code(cls) -> bool:
        """Initialised like transformers' own models. For custom code, transformers skips every module whose own
        parameters are already flagged, which is vacuously true of a module without parameters of its own, so CLIP's
        attention and MLP init would be skipped on weights a checkpoint lacks. Every SafeLlava init goes through
        `transformers.initialization`, which flags each parameter, so that shortcut is not needed."""
        return False

    def _init_weights(self, module):
        super()._init_weights(module)
        # Bare parameters are not covered by the generic init: without this they would keep uninitialised memory
        # whenever a checkpoint lacks them (e.g. when converting a stock checkpoint).
        if isinstance(module, SafeLlavaSafetyModule):
            init.normal_(module.tokens, mean=0.0, std=0.02)
            if module.llm_tokens is not None:
                init.normal_(module.llm_tokens, mean=0.0, std=0.02)

    # -- the policy beside the model ---------------------------------------------------------------------------

    @property
    def safety_policy(self) -> SafetyPolicy:
        """The [`SafetyPolicy`] saved in this model's config (validated once per set of config values; a copy of the
        validated one, so that setting its attributes, e.g. `tokenize`, changes nothing else)."""
        return copy.copy(SafetyPolicy.from_config(self.config))

    def tokenize_safety_texts(self, processor) -> dict:
        """Stores the policy texts as token ids of `processor` in the config, so that `generate` needs no tokenizer."""
        self.config.safety_text_token_ids = self.safety_policy.tokenize(processor)
        return self.config.safety_text_token_ids

    # -- saving and loading --------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        Stock `save_pretrained`, plus SafeLlava's pipeline: `config.json` names it in `custom_pipelines`, and the
        relative import below makes transformers' `custom_object_save` copy `pipeline_safe_llava.py` with the other
        remote-code files, so that `pipeline("image-text-to-text", model=folder, trust_remote_code=True)` returns
        each answer with its verdict.
        """
        from .pipeline_safe_llava import CUSTOM_PIPELINES

        self.config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)
        self._keep_flat_names_when_saving()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _keep_flat_names_when_saving(self):
        """
        transformers saves by reversing the renamings that loading used (`_weight_conversions`). A headless class that
        loaded a generation checkpoint used the `model.`-prefixed rules, which no headless key matches once reversed:
        its own rules are added, so that it saves the flat names whatever it loaded.
        """
        conversions = getattr(self, "_weight_conversions", None)
        if self.stock_class is None or not _is_headless(type(self)) or not isinstance(conversions, list):
            return
        present = {tuple(rule.source_patterns) for rule in conversions if isinstance(rule, WeightRenaming)}
        own = [rule for rule in headless_safety_renamings(self.config) if tuple(rule.source_patterns) not in present]
        self._weight_conversions = [*conversions, *own]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` that reads safetensors only, and that marks the model untrained, with a
        warning naming them, when the checkpoint lacks any weight the verdict depends on (the safety module, the vision
        tower, the query's token embeddings), so that a half-loaded model never passes for a trained one."""
        kwargs = safetensors_only(kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        if _is_headless(cls):  # a generation checkpoint's flat names (`model.safety_tokens`) too
            generation_names = {**_FLAT_SAFETY_NAMES, _FLAT_LLM_TOKENS[0]: _FLAT_LLM_TOKENS[1]}
            kwargs["key_mapping"] = {**(kwargs.get("key_mapping") or {}), **generation_names}
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error) or kwargs.get("ignore_mismatched_sizes"):
                raise
            cls._raise_safety_shape_error(pretrained_model_name_or_path, args, kwargs, error)
        # A headless model's keys lack the `model.` of the generation class's, which the prefixes name.
        prefix = f"{model.base_model_prefix}." if model.base_model is model else ""
        missing = sorted(k for k in info["missing_keys"] if f"{prefix}{k}".startswith(verdict_path_prefixes(model)))
        if missing and model.config.safety_modules_trained:
            logger.warning(
                "The checkpoint lacks weights the safety verdict depends on, which were freshly initialised: %s. "
                "The model is marked untrained (config.safety_modules_trained=False); safety-aware generation "
                "refuses to run until the safety module is trained.",
                ", ".join(missing),
            )
        if missing:
            model.config.safety_modules_trained = False
        return (model, info) if want_info else model

    @classmethod
    def _raise_safety_shape_error(cls, path, args, kwargs, error):
        """A checkpoint whose safety-module shapes disagree with its config: an error naming the config field and both
        shapes (found by a second, tolerant load), instead of transformers' generic `ignore_mismatched_sizes` one."""
        _, info = super().from_pretrained(
            path, *args, output_loading_info=True, **{**kwargs, "ignore_mismatched_sizes": True}
        )
        mismatched = [m for m in info.get("mismatched_keys", ()) if m[0].startswith(SAFETY_PARAMETER_PREFIXES)]
        if not mismatched:
            raise error
        details = "; ".join(
            f"{name} ({shape_field(name)}): checkpoint {tuple(saved)}, config {tuple(expected)}"
            for name, saved, expected in sorted(mismatched)
        )
        raise ValueError(
            f"The checkpoint's safety module does not match its config: {details}. Fix the config field(s) named to "
            "match the checkpoint, or retrain the safety module."
        ) from error

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs):
        """Refuses any weight file that is not safetensors before it is opened: a shard index can name a pickle.
        (Internal transformers API; `tests/test_transformers_canaries.py` fails when its signature changes.)"""
        pickles = [name for name in checkpoint_files or () if not str(name).endswith(".safetensors")]
        if pickles:
            raise ValueError(
                f"SafeLlava loads weights from safetensors files only; the checkpoint names {pickles} (a pickle can run "
                "code when opened). Convert the checkpoint to safetensors in a trusted environment."
            )
        return super(SafetyPreTrainedMixin, model)._load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs)

    # -- the verdict model ---------------------------------------------------------------------------------------

    @classmethod
    def from_verdict_checkpoint(cls, checkpoint, config, device=None, dtype=None, embedding_rows=None):
        """
        The *verdict model* of a checkpoint: this class built on `meta`, then only the parts a verdict reads
        (`verdict_parts`: vision tower, safety module, input embeddings) given the checkpoint's weights, renamed as
        `from_pretrained` renames them. The language model's layers, its head and the multi-modal projector stay on
        `meta`: they hold no memory, and calling them fails loudly. `assess_safety` works as on the full model.

        Args:
            checkpoint: the weights, read through two methods (this file is remote code and opens no file itself):
                `keys()`, the checkpoint's tensor names as saved, and `read({key: rows or None})`, those tensors
                (only `rows` of a tensor when given). `modeling_safe_llava.fileio.SafetensorsCheckpoint(path)` reads
                a folder or Hub id.
            config: this class's config (e.g. `cls.config_class.from_pretrained(path)`).
            device: where the verdict's parts go (default CPU).
            dtype: a torch dtype, one of `"float32"`, `"bfloat16"`, `"float16"`, or `"auto"`/None (the config's).
            embedding_rows (`list[int]`, *optional*): token ids; of the input embedding table only these rows are read
                and held (`keep_embedding_rows`), e.g. the tokens a chat template puts first in a prompt.

        Raises `ValueError` naming the verdict's weights the checkpoint lacks.
        """
        device = torch.device(device or "cpu")
        dtype = resolve_dtype(dtype, config)
        with torch.device("meta"):
            model = cls(config)
        if model.base_model is model:
            raise ValueError(
                f"{cls.__name__} is a headless model; build the verdict model from its ForConditionalGeneration class "
                "(the checkpoint's keys are that class's)."
            )
        rows = {}
        if embedding_rows is not None:
            keep_embedding_rows(model.get_input_embeddings(), embedding_rows)
            rows = {VERDICT_EMBEDDING_KEY: list(embedding_rows)}
        wanted = {name for name in model.state_dict() if name.startswith(verdict_path_prefixes(model))}
        state = _read_verdict_state(checkpoint, model, wanted, rows)
        missing = sorted(wanted - set(state))
        if missing:
            raise ValueError(
                f"The checkpoint lacks weights the safety verdict depends on: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}. Use a SafeLlava folder written by save_pretrained or export."
            )
        model.load_state_dict(state, strict=False, assign=True)
        _materialize_verdict_buffers(model, device)
        for module in verdict_modules(model):
            module.to(device=device, dtype=dtype)
        # Placed by module, as a dispatched model is: `model.device` (its first parameter) may be one left on `meta`.
        model.hf_device_map = {prefix.rstrip("."): str(device) for prefix in verdict_path_prefixes(model)}
        return model.eval()

    # -- construction from a stock model -------------------------------------------------------------------------

    @classmethod
    def _from_stock(cls, model_or_path, config_overrides: dict):
        """The SafeLlava of a stock model (instance, folder or Hub id) of `cls.stock_class`: every stock weight kept
        bit for bit, the safety module freshly initialised and marked untrained."""
        load_kwargs = {k: config_overrides.pop(k) for k in _LOAD_KWARGS if k in config_overrides}
        if isinstance(model_or_path, cls.stock_class):
            model = cls._from_stock_model(model_or_path, config_overrides)
        else:
            model = cls._from_stock_checkpoint(model_or_path, config_overrides, load_kwargs)
        model.generation_config = generation_config_with_threshold(model.generation_config, model.config.safety_threshold)
        return model

    @classmethod
    def _from_stock_model(cls, stock, config_overrides):
        config = cls.config_class.from_base_config(stock.config, **config_overrides)
        model = cls(config).to(dtype=stock.dtype, device=stock.device)
        missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
        _check_only_safety_weights_missing(missing, unexpected, cls.stock_class.__name__)
        model.generation_config = GenerationConfig.from_dict(stock.generation_config.to_dict())
        return model

    @classmethod
    def _from_stock_checkpoint(cls, path, config_overrides, load_kwargs):
        hub_kwargs = {k: v for k, v in load_kwargs.items() if k in _HUB_KWARGS}
        stock_config = AutoConfig.from_pretrained(path, **hub_kwargs)
        expected = cls.stock_class.config_class.model_type
        if stock_config.model_type != expected:
            raise ValueError(
                f"{cls.__name__}.from_base expects a {expected!r} checkpoint ({cls.stock_class.__name__}); {path!r} has "
                f"model_type {stock_config.model_type!r}."
            )
        config = cls.config_class.from_base_config(stock_config, **config_overrides)
        model, info = super(SafetyPreTrainedMixin, cls).from_pretrained(
            path, config=config, output_loading_info=True, **safetensors_only(load_kwargs)
        )
        _check_only_safety_weights_missing(info["missing_keys"], info["unexpected_keys"], cls.stock_class.__name__)
        model.config.safety_modules_trained = False
        return model


def _is_headless(model_class) -> bool:
    """A headless class (`SafeLlavaModel`, ...): no language-modeling head, so no `generate`."""
    return not issubclass(model_class, GenerationMixin)


def _check_only_safety_weights_missing(missing, unexpected, stock_name: str):
    not_safety = sorted(k for k in missing if not k.startswith(SAFETY_PARAMETER_PREFIXES))
    if not_safety or unexpected:
        raise ValueError(
            f"The {stock_name} weights do not match this SafeLlava configuration: "
            f"missing {not_safety[:10]}, unexpected {sorted(unexpected)[:10]}."
        )


# -- the verdict model's parts ------------------------------------------------------------------------------------

VERDICT_EMBEDDING_KEY = "model.language_model.embed_tokens.weight"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, config) -> torch.dtype:
    """A torch dtype from `dtype`: a torch dtype, one of `DTYPES`' names, or `"auto"`/None (the config's, else
    float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(saved, torch.dtype):
            return saved
        return DTYPES.get(str(saved).replace("torch.", ""), torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be a torch dtype, one of {sorted(DTYPES)}, or 'auto', got {dtype!r}.")
    return DTYPES[dtype]


def verdict_modules(model) -> list:
    """The modules a verdict reads (`verdict_path_prefixes`): vision tower, safety module, input embeddings."""
    return [model.get_submodule(prefix.rstrip(".")) for prefix in verdict_path_prefixes(model)]


def checkpoint_key_renamer(model):
    """`checkpoint key -> model key` for `model`: the renamings `from_pretrained` applies to it (its base's registered
    conversion mapping, with the stock base's legacy layouts, and its sub-models' scoped ones)."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta_state = model.state_dict()

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)[0]

    return rename


def _read_verdict_state(checkpoint, model, wanted: set, rows: dict) -> dict:
    """The tensors named `wanted` (keys of `model`) from `checkpoint`, read under their checkpoint names; of a tensor in
    `rows` (`{model key: row indices}`), only those rows."""
    rename = checkpoint_key_renamer(model)
    to_read = {}
    for checkpoint_key in checkpoint.keys():
        model_key = rename(checkpoint_key)
        if model_key in wanted:
            to_read[checkpoint_key] = model_key
    tensors = checkpoint.read({key: rows.get(model_key) for key, model_key in to_read.items()})
    return {to_read[key]: tensor for key, tensor in tensors.items()}


def keep_embedding_rows(embedding, token_ids: list[int]):
    """Turns `embedding` (any `nn.Embedding` subclass, e.g. Gemma 3's scaled one, its forward kept) into one that
    holds only the rows of `token_ids` (its weight becomes `(len(token_ids), hidden)` on `meta`, to be loaded): input
    ids are mapped to those rows before its forward, and an id it does not hold raises `ValueError`."""
    kept = torch.tensor(sorted(set(token_ids)), dtype=torch.long)
    hidden = embedding.weight.shape[1]
    embedding.weight = nn.Parameter(torch.empty(len(kept), hidden, device="meta"), requires_grad=False)
    embedding.num_embeddings, embedding.padding_idx = len(kept), None
    embedding.kept_token_ids = kept
    embedding.register_forward_pre_hook(_to_kept_rows)


def _to_kept_rows(embedding, args):
    ids, kept = args[0], embedding.kept_token_ids.to(args[0].device)
    local = torch.searchsorted(kept, ids).clamp(max=len(kept) - 1)
    if not bool((kept[local] == ids).all()):
        unknown = sorted(set(ids[kept[local] != ids].tolist()))[:5]
        raise ValueError(
            f"This verdict model holds the input embeddings of tokens {kept.tolist()} only (those its chat template "
            f"puts first in a prompt), but the safety head's query reads token(s) {unknown}."
        )
    return (local, *args[1:])


def _materialize_verdict_buffers(model, device):
    """The verdict modules' non-persistent buffers (position ids, Gemma 3's embedding scale, ...), which no checkpoint
    holds, computed as `from_pretrained` computes them: by the model's own weight initialisation, which skips the
    loaded tensors (flagged initialised, as `from_pretrained` flags them) and is a no-op on `meta`."""
    for module in verdict_modules(model):
        for parameter in module.parameters():
            parameter._is_hf_initialized = True
        for name, buffer in module.named_buffers():
            owner, _, leaf = name.rpartition(".")
            if buffer.device.type == "meta":  # not in the checkpoint: non-persistent
                module.get_submodule(owner).register_buffer(leaf, torch.empty_like(buffer, device=device), persistent=False)
            else:
                buffer._is_hf_initialized = True
    model.initialize_weights()


__all__ = [
    "DTYPES",
    "SafetyPreTrainedMixin",
    "safety_checkpoint_mapping",
    "headless_safety_renamings",
    "safetensors_only",
    "VERDICT_PATH_PREFIXES",
    "verdict_parts",
    "verdict_path_prefixes",
    "verdict_modules",
    "keep_embedding_rows",
]
