"""A judge: the part of a SafeLlava that makes the safety verdict, and nothing else.

`SafetyJudge.from_pretrained(folder)` builds the checkpoint's model class (any base: its `model_type` picks the class in
`bases.py`) on the `meta` device, then gives real weights to the parts a verdict reads
(`safety_loading_safe_llava.verdict_path_prefixes`: the same parts for every base, its vision tower where it keeps it):

- the vision tower (the safety head reads its hidden states: LLaVA-1.5's and LLaVA-NeXT's CLIP layer, every anyres
  crop for LLaVA-NeXT; SigLIP's last state for Gemma 3, average-pooled as Gemma 3 pools it, which needs no weights);
- the safety module (projector, head safety tokens, head);
- of the language model's input embedding table, only the rows the verdict reads (the head's query is the embedding of
  each row's first real token; the base's own embedding class, e.g. Gemma 3's scaled one): `query_token_ids` finds
  the tokens the processor puts first in any prompt of its chat template (BOS for every registered base), plus the
  image placeholder. Gemma 3 4B's table is 262k rows (1.25 GiB in bf16); its gate keeps 2. A prompt that starts with
  another token (a chat template whose first token depends on the text) fails loudly; a template like that keeps the
  whole table.

Those tensors alone are read from the safetensors files (a Hub id downloads only the shards that hold them), renamed
by the base's checkpoint conversion mapping as `from_pretrained` renames them. The language model's layers, its head
and the multi-modal projector stay on `meta`: they hold no memory, and calling them fails loudly. The verdict goes
through `assess_safety`, whose image encoding (`encode_images_for_safety`) reads only those parts. That is what a gate
in front of an engine that already runs the language model needs. `judge_memory_bytes` measures it; see README
"Serving" for the 7B-class numbers of each base.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bases import base_for_model_type, load_safe_processor
from ..pipeline_safe_llava import NOT_JUDGED_NO_IMAGE, NOT_JUDGED_SAFETY_OFF
from ..policy_safe_llava import decide_safety_actions
from ..safety_loading_safe_llava import verdict_parts, verdict_path_prefixes
from ..safety_model_safe_llava import check_safety_ready


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class JudgeRow:
    """One conversation to judge: processor-format `messages`, its PIL `images`, and `generate`'s safety arguments."""

    messages: list[dict]
    images: list = field(default_factory=list)
    safety_threshold: float | dict | None = None
    safety_actions: dict | None = None


@dataclass
class JudgeResult:
    """A row's `safety` entry (`pipeline_safe_llava.safety_entries` format), its prompt length in tokens, and the
    `ValueError` that made the row fail (then `safety` is None). One row's error never fails the others."""

    safety: dict | None
    prompt_tokens: int = 0
    error: ValueError | None = None


class SafetyJudge:
    """
    The verdict of a SafeLlava without its language model.

    Args:
        model: a SafeLlava of any base (`bases.BASES`) whose vision tower, safety module and input embeddings hold
            weights (the rest may sit on `meta`).
        processor: its processor (chat template, tokenizer, image processor).
        allow_untrained_safety (`bool`): judge with untrained safety modules (tests only; fails closed otherwise).
    """

    def __init__(self, model, processor, allow_untrained_safety: bool = False):
        check_safety_ready(model.config, allow_untrained_safety)
        self.model, self.processor = model.eval(), processor
        self.policy = model.safety_policy  # built and validated once; each request resolves its own call rule
        self.allow_untrained_safety = allow_untrained_safety
        self.config = model.config

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None, revision=None, allow_untrained_safety=False):
        """The judge of a SafeLlava folder or Hub id: see the module docstring. `dtype`: a torch dtype, one of
        `"float32"`, `"bfloat16"`, `"float16"`, or `"auto"`/None (the checkpoint's)."""
        config = load_safe_config(path, revision=revision)
        processor = load_safe_processor(path, config.model_type, revision=revision)
        rows = query_token_ids(processor, config)
        model = build_judge_model(config, path, revision=revision, device=device, dtype=dtype, embedding_rows=rows)
        return cls(model, processor, allow_untrained_safety=allow_untrained_safety)

    @property
    def device(self) -> torch.device:
        return self.model.model.vision_tower.device

    def prompt(self, messages: list[dict]) -> str:
        """The chat template's prompt, as `generate`'s callers build it (`add_generation_prompt=True`)."""
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def count_tokens(self, text: str, add_special_tokens: bool = False) -> int:
        return len(self.processor.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    @torch.no_grad()
    def judge(self, rows: list[JudgeRow]) -> list[JudgeResult]:
        """One `JudgeResult` per row. The rows that need a verdict share one vision-tower and safety-head call; each
        row keeps its own threshold and actions (the decision rule runs per row on that call's probabilities)."""
        results, todo = [], []
        for index, row in enumerate(rows):
            result, settings = self._prepare(row)
            results.append(result)
            if settings is not None:
                todo.append((index, settings))
        if todo:
            self._judge_batch([rows[i] for i, _ in todo], [r for _, r in todo], results, [i for i, _ in todo])
        return results

    def _prepare(self, row: JudgeRow):
        """The row's prompt length and, when it needs a verdict, its resolved `(thresholds, actions)`."""
        try:
            prompt_tokens = self.count_tokens(self.prompt(row.messages), add_special_tokens=True)
            prompt_tokens += len(row.images) * (self.config.image_seq_length - 1)  # exact once judged (`_assess`)
            rule = self.policy.for_call(row.safety_threshold, row.safety_actions, self.model.generation_config)
            thresholds, actions = rule.thresholds, rule.actions
        except ValueError as error:
            return JudgeResult(None, error=error), None
        if not row.images:
            return JudgeResult({"judged": False, "reason": NOT_JUDGED_NO_IMAGE}, prompt_tokens), None
        if bool((thresholds >= 1.0).all()):
            return JudgeResult({"judged": False, "reason": NOT_JUDGED_SAFETY_OFF}, prompt_tokens), None
        return JudgeResult(None, prompt_tokens), (thresholds, actions)

    def _judge_batch(self, rows, settings, results, indices):
        try:
            assessment, lengths = self._assess([row.messages for row in rows], [i for row in rows for i in row.images])
        except ValueError as error:  # a bad image or prompt: judge the rows one by one, so that only it fails
            if len(rows) == 1:
                results[indices[0]] = JudgeResult(None, results[indices[0]].prompt_tokens, error)
                return
            for row, setting, index in zip(rows, settings, indices):
                self._judge_batch([row], [setting], results, [index])
            return
        for k, ((thresholds, actions), index) in enumerate(zip(settings, indices)):
            decided = decide_safety_actions(
                assessment.level_probs[k : k + 1],
                assessment.type_probs[k : k + 1],
                thresholds,
                actions,
                self.config.safety_level_labels,
                self.config.safety_type_labels,
                assessment.images_per_row[k : k + 1],
            )
            results[index].safety = {"judged": True, **decided.to_records()[0]}
            results[index].prompt_tokens = int(lengths[k])

    def _assess(self, conversations: list[list[dict]], images: list):
        """`model.assess_safety` on one left-padded batch (its thresholds are replaced per row by the caller), and
        each row's prompt length in tokens (images expanded, as the language model would read it)."""
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        prompts = [self.prompt(messages) for messages in conversations]
        inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.model.vision_tower.dtype)  # the base's image
        # fields (LLaVA-NeXT's `image_sizes`, Gemma 3's `token_type_ids`, ...) go along: each base takes what it reads
        assessment = self.model.assess_safety(
            **inputs, safety_threshold=0.5, allow_untrained_safety=self.allow_untrained_safety
        )
        return assessment, inputs["attention_mask"].sum(dim=1).tolist()


def load_safe_config(path: str, revision=None):
    """The config of a SafeLlava folder or Hub id of any base; a `ValueError` naming the accepted model types
    otherwise."""
    from transformers import PretrainedConfig

    model_type = PretrainedConfig.get_config_dict(path, revision=revision)[0].get("model_type")
    return base_for_model_type(model_type).config_class.from_pretrained(path, revision=revision)


def query_token_ids(processor, config) -> list[int] | None:
    """The token ids whose input embeddings a verdict reads: the first real token of every prompt the processor builds
    from its chat template (probed with user and system texts that differ), and the image placeholder. None when the
    first token depends on the text (then the judge keeps the whole table)."""
    from PIL import Image

    image = Image.new("RGB", (32, 32), (127, 127, 127))
    probes = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}] for text in ("a", "Why?")
    ] + [
        [{"role": "system", "content": [{"type": "text", "text": text}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "b"}]}]  # fmt: skip
        for text in ("x", "You are helpful.")
    ]
    firsts = set()
    for messages in probes:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        firsts.add(int(inputs["input_ids"][0, int(inputs["attention_mask"][0].argmax())]))
    if len(firsts) != 1:
        return None
    return sorted(firsts | {int(config.image_token_id)})


def build_judge_model(config, path: str, revision=None, device=None, dtype=None, embedding_rows=None):
    """The model class of `config`'s base on `meta`, with real vision tower, safety module and input embeddings
    (`verdict_path_prefixes`) loaded from `path`'s safetensors; with `embedding_rows` (token ids), only those rows of
    the embedding table (`keep_embedding_rows`). Raises `ValueError` naming any of those weights the checkpoint
    lacks."""
    device = torch.device(device or "cpu")
    dtype = _resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = base_for_model_type(config.model_type).model_class(config)
    rows = {}
    if embedding_rows is not None:
        keep_embedding_rows(model.get_input_embeddings(), embedding_rows)
        rows = {EMBEDDING_KEY: embedding_rows}
    wanted = {name for name in model.state_dict() if name.startswith(verdict_path_prefixes(model))}
    state = read_verdict_weights(path, wanted, model, revision=revision, rows=rows)
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(
            f"The checkpoint at {path!r} lacks weights the safety verdict depends on: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}. Serve a SafeLlava folder written by save_pretrained or export."
        )
    model.load_state_dict(state, strict=False, assign=True)
    _materialize_verdict_buffers(model, device)
    for module in verdict_modules(model):
        module.to(device=device, dtype=dtype)
    # Placed by module, as a dispatched model is: `model.device` (its first parameter) may be one left on `meta`.
    model.hf_device_map = {prefix.rstrip("."): str(device) for prefix in verdict_path_prefixes(model)}
    return model.eval()


EMBEDDING_KEY = "model.language_model.embed_tokens.weight"


def keep_embedding_rows(embedding: nn.Embedding, token_ids: list[int]):
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
            f"This gate holds the input embeddings of tokens {kept.tolist()} only (those its chat template puts first "
            f"in a prompt), but the safety head's query reads token(s) {unknown}."
        )
    return (local, *args[1:])


def verdict_modules(model) -> list[nn.Module]:
    """The modules a verdict reads (`verdict_path_prefixes`): vision tower, safety module, input embeddings."""
    return [model.get_submodule(prefix.rstrip(".")) for prefix in verdict_path_prefixes(model)]


def _materialize_verdict_buffers(model, device):
    """The verdict modules' non-persistent buffers (position ids, Gemma 3's embedding scale, ...), which no checkpoint
    holds, computed as `from_pretrained` computes them: by the model's own weight initialisation, which skips the
    loaded tensors (flagged initialised) and is a no-op on `meta`."""
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


def _resolve_dtype(dtype, config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(saved, torch.dtype):
            return saved
        return _DTYPES.get(str(saved).replace("torch.", ""), torch.float32)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}.")
    return _DTYPES[dtype]


def checkpoint_key_renamer(model):
    """`checkpoint key -> model key` for `model`: the renamings `from_pretrained` applies to it (its base's registered
    conversion mapping, with the stock base's legacy layouts, and its sub-models' scoped ones)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta_state = model.state_dict()

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)[0]

    return rename


def read_verdict_weights(path: str, wanted: set[str], model, revision=None, rows=None) -> dict[str, torch.Tensor]:
    """The tensors named `wanted` (keys of `model`) from `path`'s safetensors, reading no other tensor and, for a Hub
    id, downloading only the shards that hold them. `rows` (`{model key: row indices}`): of those tensors, only these
    rows are read."""
    rows = rows or {}
    from safetensors import safe_open

    shards = _shards_by_key(path, revision)
    rename = checkpoint_key_renamer(model)
    by_file: dict[str, list[tuple[str, str]]] = {}
    for checkpoint_key, shard in shards.items():
        model_key = rename(checkpoint_key)
        if model_key in wanted:
            by_file.setdefault(shard, []).append((checkpoint_key, model_key))
    state = {}
    for shard, keys in by_file.items():
        with safe_open(_resolve_file(path, shard, revision), framework="pt") as handle:
            for checkpoint_key, model_key in keys:
                state[model_key] = _read_tensor(handle, checkpoint_key, rows.get(model_key))
    return state


def _read_tensor(handle, key: str, rows: list[int] | None) -> torch.Tensor:
    """A tensor of an open safetensors file, or only its `rows` (read row by row: the rest never leaves the file)."""
    if rows is None:
        return handle.get_tensor(key)
    tensor = handle.get_slice(key)
    return torch.cat([tensor[row : row + 1] for row in sorted(set(rows))])


def _shards_by_key(path: str, revision=None) -> dict[str, str]:
    """`{checkpoint key: safetensors file name}`, from the shard index or the single `model.safetensors`."""
    from safetensors import safe_open

    try:
        index_file = _resolve_file(path, "model.safetensors.index.json", revision)
    except OSError:
        index_file = None
    if index_file is not None:
        with open(index_file, encoding="utf-8") as handle:
            return dict(json.load(handle)["weight_map"])
    with safe_open(_resolve_file(path, "model.safetensors", revision), framework="pt") as handle:
        return {key: "model.safetensors" for key in handle.keys()}


def _resolve_file(path: str, name: str, revision=None) -> str:
    if os.path.isdir(path):
        local = os.path.join(path, name)
        if not os.path.isfile(local):
            raise OSError(f"{path!r} has no {name}.")
        return local
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(path, name, revision=revision)
    except Exception as error:  # the hub client raises many types; a missing file is an OSError to callers
        raise OSError(f"Cannot fetch {name} of {path!r}: {error}") from error


def judge_memory_bytes(model) -> dict[str, int]:
    """Bytes held by the judge's parts (parameters and buffers not on `meta`), and by the parts left on `meta`."""
    held = {"vision_tower": 0, "safety_module": 0, "embed_tokens": 0, "other": 0}
    parts = verdict_parts(model)
    on_meta = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        size = tensor.numel() * tensor.element_size()
        if tensor.device.type == "meta":
            on_meta += size
            continue
        part = next((p for p, prefix in parts.items() if name.startswith(prefix)), "other")
        held[part] += size
    return {**held, "total": sum(held.values()), "not_loaded": on_meta}
