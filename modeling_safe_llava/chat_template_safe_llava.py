# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""Where the safety policy's texts go in a chat template: the tokens a template puts after the user's message (a
safe hint goes right before them), how it renders a hint there, and the tokens of its generation prompt. Each is
found by rendering a probe conversation with the processor's (or tokenizer's) own template, so no base's template is
written down here.

This file is remote code: it imports only torch, transformers and its sibling files.
"""


_PROBE_TEXT = "probe"
_PROBE_CONVERSATION = [{"role": "user", "content": [{"type": "text", "text": _PROBE_TEXT}]}]


def _render_probe(processor_or_tokenizer, appended: str = "") -> tuple[str, int]:
    """The probe conversation with `appended` after the user's text, rendered with the generation prompt, and where
    the probe text ends in it."""
    if getattr(processor_or_tokenizer, "chat_template", None) is None:
        raise ValueError("This processor/tokenizer has no chat template, so the assistant-turn marker is unknown.")
    conversation = [{"role": "user", "content": [{"type": "text", "text": _PROBE_TEXT + appended}]}]
    rendered = processor_or_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return rendered, rendered.rindex(_PROBE_TEXT) + len(_PROBE_TEXT)


def hint_marker_ids(processor_or_tokenizer) -> list[int]:
    """
    Token ids the chat template puts after the user message's text, the generation prompt included: a safe hint goes
    right before them, at the end of the user's turn, where a chat client appending it to the message puts it.
    LLaVA-1.5: ` ASSISTANT:` (the generation prompt itself); Gemma 3: `<end_of_turn>` `\n<start_of_turn>model\n`
    (the user turn's end, then the generation prompt), so that the hint stays inside the user's turn.
    """
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    rendered, end = _render_probe(processor_or_tokenizer)
    full = tokenizer.encode(rendered, add_special_tokens=False)
    head = tokenizer.encode(rendered[:end], add_special_tokens=False)
    return _ids_after_common_prefix(full, head, "after the user's message")


def rendered_hint(processor_or_tokenizer, hint: str) -> str:
    """`hint` as the chat template renders it at the end of the user's message (Gemma 3's template trims message
    texts, so a hint's trailing newline is dropped); `hint` itself when the template does not keep it in one piece."""
    plain, end = _render_probe(processor_or_tokenizer)
    with_hint, _ = _render_probe(processor_or_tokenizer, hint)
    after = len(plain) - end
    if with_hint[:end] == plain[:end] and with_hint[len(with_hint) - after :] == plain[end:]:
        return with_hint[end : len(with_hint) - after]
    return hint


def assistant_prefix_ids(processor_or_tokenizer) -> list[int]:
    """Token ids the chat template adds for `add_generation_prompt=True`: where an answer starts (the hint goes
    right before them)."""
    if getattr(processor_or_tokenizer, "chat_template", None) is None:
        raise ValueError("This processor/tokenizer has no chat template, so the assistant-turn marker is unknown.")
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    render = lambda prompt: processor_or_tokenizer.apply_chat_template(  # noqa: E731
        _PROBE_CONVERSATION, add_generation_prompt=prompt, tokenize=False
    )
    with_prompt = tokenizer.encode(render(True), add_special_tokens=False)
    without = tokenizer.encode(render(False), add_special_tokens=False)
    return _ids_after_common_prefix(with_prompt, without, "for add_generation_prompt=True")


def _ids_after_common_prefix(full: list[int], head: list[int], where: str) -> list[int]:
    """The ids of `full` after the longest prefix it shares with `head`: what a chat template adds `where`."""
    common = 0
    while common < min(len(full), len(head)) and full[common] == head[common]:
        common += 1
    if common == len(full):
        raise ValueError(f"The chat template adds nothing {where}; hints cannot be placed.")
    return full[common:]


__all__ = ["assistant_prefix_ids", "hint_marker_ids", "rendered_hint"]
