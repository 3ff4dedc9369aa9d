"""Streamers that learn SafeLlava's safety verdict before the first token.

`model.generate(..., streamer=s)` calls `s.on_safety_assessment(assessment)` (when `s` has that method) once the
images are judged and before anything is generated; a refused row then streams its refusal as text (prompt,
refusal, end), as if the model had written it. These stock-streamer subclasses turn the assessment into one
`safety` entry (the pipeline's, see `pipeline_safe_llava.safety_entries`) and hand it over first:

```python
>>> streamer = SafeLlavaTextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
>>> Thread(target=model.generate, kwargs={**inputs, "streamer": streamer, "max_new_tokens": 64}).start()
>>> safety = streamer.wait_for_verdict(timeout=60)  # {"judged": True, "flagged": ..., "action": ..., ...}
>>> answer = "".join(streamer)                     # the answer, or the refusal
```

A generation without a verdict (safety off with `safety_threshold=1.0`, or no image) gives the entry
`{"judged": False, "reason": ...}` at its first token. Like stock streamers, these take batch size 1 only: a verdict
for more rows raises ValueError before anything is generated.
"""

import threading
from typing import Callable

from transformers import TextIteratorStreamer, TextStreamer

from ..pipeline_safe_llava import NOT_JUDGED_NO_IMAGE, safety_entries

NOT_JUDGED_BEFORE_FIRST_TOKEN = (
    "no verdict came before the first token: safety is off (safety_threshold=1.0) or there is no image to judge"
)


class _SafetyVerdictMixin:
    """The verdict handling of both streamers: `safety` (the entry), `safety_assessment` (the raw assessment or
    None), the `on_verdict` callback, and `wait_for_verdict`."""

    def _init_verdict(self, on_verdict: Callable[[dict], None] | None):
        if on_verdict is not None and not callable(on_verdict):
            raise ValueError(f"on_verdict must be a callable taking the safety dict, got {type(on_verdict).__name__}.")
        self.on_verdict = on_verdict
        self.safety = None
        self.safety_assessment = None
        self._verdict_pending = True  # no verdict yet for the current generation
        self._verdict_given = threading.Event()

    def on_safety_assessment(self, assessment):
        """Called by SafeLlava's `generate` before the first token. Raises ValueError for more than one row."""
        if len(assessment.actions) != 1:
            raise ValueError(
                f"{type(self).__name__} only supports batch size 1 (as stock TextStreamer); this generation has "
                f"{len(assessment.actions)} rows. Generate one input at a time to stream it."
            )
        self.safety_assessment = assessment
        self._give_verdict(safety_entries(assessment)[0])

    def _give_verdict(self, safety: dict):
        self.safety = safety
        self._verdict_pending = False
        if self.on_verdict is not None:
            self.on_verdict(safety)
        self.show_verdict(safety)
        self._verdict_given.set()

    def show_verdict(self, safety: dict):
        """Hook for subclasses: what the streamer itself does with the verdict (default: nothing)."""

    def put(self, value):
        if self._verdict_pending:
            self.safety_assessment = None
            self._give_verdict({"judged": False, "reason": NOT_JUDGED_BEFORE_FIRST_TOKEN})
        super().put(value)

    def end(self):
        super().end()
        self._verdict_pending = True  # a reused streamer waits for the next generation's verdict

    def wait_for_verdict(self, timeout: float | None = None) -> dict:
        """
        Blocks until the verdict of the generation this streamer is attached to is known, and returns its entry.

        Raises:
            TimeoutError: no verdict within `timeout` seconds (e.g. `generate` failed before judging).
        """
        if not self._verdict_given.wait(timeout):
            raise TimeoutError(f"No safety verdict within {timeout} s; did generate fail before judging the images?")
        return self.safety


class SafeLlavaTextStreamer(_SafetyVerdictMixin, TextStreamer):
    """
    Stock [`TextStreamer`] (prints the text as it comes) that first receives the verdict.

    Args:
        tokenizer, skip_prompt, **decode_kwargs: as stock `TextStreamer`.
        on_verdict (`Callable[[dict], None]`, *optional*): called with the `safety` entry before the first token.
        print_verdict (`bool`, defaults to `True`): also write one line with the verdict where the text goes
            (through `on_finalized_text`) before the answer.
    """

    def __init__(
        self, tokenizer, skip_prompt: bool = False, on_verdict=None, print_verdict: bool = True, **decode_kwargs
    ):
        super().__init__(tokenizer, skip_prompt=skip_prompt, **decode_kwargs)
        self._init_verdict(on_verdict)
        self.print_verdict = print_verdict

    def show_verdict(self, safety: dict):
        if self.print_verdict:
            self.on_finalized_text(verdict_line(safety) + "\n")


class SafeLlavaTextIteratorStreamer(_SafetyVerdictMixin, TextIteratorStreamer):
    """
    Stock [`TextIteratorStreamer`] (iterate over the text from another thread) that first receives the verdict:
    `wait_for_verdict()` returns it, `on_verdict` is called with it, and `safety` holds it before the first text
    reaches the queue. The queue holds text only, as stock's.

    Args:
        tokenizer, skip_prompt, timeout, **decode_kwargs: as stock `TextIteratorStreamer`.
        on_verdict (`Callable[[dict], None]`, *optional*): called (in the generating thread) with the `safety` entry.
    """

    def __init__(
        self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, on_verdict=None, **decode_kwargs
    ):
        super().__init__(tokenizer, skip_prompt=skip_prompt, timeout=timeout, **decode_kwargs)
        self._init_verdict(on_verdict)


def verdict_line(safety: dict) -> str:
    """One readable line for a `safety` entry, e.g. `[safety] flagged: Privacy, level 3 (Reject), risk 0.97 > 0.50:
    refuse`."""
    if not safety.get("judged"):
        return f"[safety] not judged: {safety.get('reason', NOT_JUDGED_NO_IMAGE)}"
    verdict = "flagged" if safety["flagged"] else "not flagged"
    comparison = ">" if safety["flagged"] else "<="
    return (
        f"[safety] {verdict}: {safety['category_name']}, level {safety['level']} ({safety['level_name']}), "
        f"risk {safety['risk']:.2f} {comparison} {safety['threshold']:.2f}: {safety['action']}"
    )


__all__ = ["SafeLlavaTextStreamer", "SafeLlavaTextIteratorStreamer", "verdict_line"]
