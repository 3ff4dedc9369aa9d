"""Streaming (issue 13): the streamer learns the verdict before the first token, a refusal streams as text, and a
streamer refuses a batch of more than one row (ValueError, as stock's TextStreamer)."""

import threading

import pytest
from conftest import chat_prompt, random_image
from stock_contract import force_safety_verdicts
from transformers import TextStreamer

from modeling_safe_llava.tools.streaming import (
    NOT_JUDGED_BEFORE_FIRST_TOKEN,
    SafeLlavaTextIteratorStreamer,
    SafeLlavaTextStreamer,
    verdict_line,
)

ILLEGAL, CLEAN = 1, 6


class RecordingStreamer(SafeLlavaTextStreamer):
    """Records every call in order instead of printing."""

    def __init__(self, *args, **kwargs):
        self.calls = []
        super().__init__(*args, on_verdict=lambda safety: self.calls.append(("verdict", safety)), **kwargs)

    def put(self, value):
        self.calls.append(("put", value.numel()))
        super().put(value)

    def end(self):
        self.calls.append(("end", None))
        super().end()

    def on_finalized_text(self, text, stream_end=False):
        self.calls.append(("text", text))


def inputs_for(processor, rows: int = 1):
    images = [random_image(i) for i in range(rows)]
    texts = [chat_prompt(processor)] * rows
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def generate_forced(model, processor, verdicts, **kwargs):
    handles = force_safety_verdicts(model, verdicts)
    try:
        return model.generate(**inputs_for(processor, len(verdicts)), do_sample=False, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def test_the_streamer_sees_the_assessment_before_any_token(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    streamer = RecordingStreamer(processor.tokenizer, skip_prompt=True)
    out = generate_forced(model, processor, [(0, CLEAN)], streamer=streamer, max_new_tokens=4, return_dict_in_generate=True)
    kinds = [kind for kind, _ in streamer.calls]
    assert kinds[0] == "verdict" and kinds[1] == "text" and kinds[2] == "put" and "end" in kinds
    assert kinds.count("verdict") == 1
    safety = streamer.calls[0][1]
    assert safety == streamer.safety and safety["judged"] and safety["action"] == "allow" and not safety["flagged"]
    assert streamer.calls[1][1] == verdict_line(safety) + "\n"  # the printed verdict line comes first too
    assert streamer.safety_assessment is not None and streamer.safety_assessment.actions == out.safety_assessment.actions


def test_a_refused_row_streams_the_refusal_text(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    streamer = RecordingStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, print_verdict=False)
    out = generate_forced(model, processor, [(3, ILLEGAL)], streamer=streamer, max_new_tokens=200, return_dict_in_generate=True)
    assert streamer.calls[0][0] == "verdict" and streamer.safety["action"] == "refuse"
    streamed = "".join(text for kind, text in streamer.calls if kind == "text")
    prompt_length = inputs_for(processor)["input_ids"].shape[1]
    refusal = processor.decode(out.sequences[0, prompt_length:], skip_special_tokens=True)
    assert refusal.startswith("I'm sorry, but I can't help with this request")
    assert streamed.strip() == refusal.strip()


def test_a_streamer_with_more_than_one_row_raises_as_stock_does(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    with pytest.raises(ValueError, match="batch size 1"):  # safety on: raised at the verdict, before generation
        generate_forced(model, processor, [(0, CLEAN), (0, CLEAN)], streamer=SafeLlavaTextStreamer(processor.tokenizer), max_new_tokens=2)
    with pytest.raises(ValueError, match="batch size 1"):  # safety off: stock generate and stock streamer
        model.generate(**inputs_for(processor, 2), streamer=SafeLlavaTextStreamer(processor.tokenizer), max_new_tokens=2, safety_threshold=1.0)
    with pytest.raises(ValueError, match="batch size 1"):  # what stock does
        model.generate(**inputs_for(processor, 2), streamer=TextStreamer(processor.tokenizer), max_new_tokens=2, safety_threshold=1.0)


def test_iterator_streamer_gives_the_verdict_first_and_then_the_text(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    streamer = SafeLlavaTextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    results = {}
    thread = threading.Thread(
        target=lambda: results.update(out=generate_forced(model, processor, [(3, ILLEGAL)], streamer=streamer,
                                                          max_new_tokens=200, return_dict_in_generate=True))
    )  # fmt: skip
    thread.start()
    safety = streamer.wait_for_verdict(timeout=60)
    text = "".join(streamer)
    thread.join()
    assert safety["action"] == "refuse" and safety["category_name"] == "Illegal Risk"
    assert text.startswith("I'm sorry") and "{" not in text  # the queue holds text only


def test_without_a_verdict_the_first_token_says_not_judged(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    streamer = RecordingStreamer(processor.tokenizer, skip_prompt=True)
    model.generate(**inputs_for(processor), streamer=streamer, max_new_tokens=2, safety_threshold=1.0)
    kinds = [kind for kind, _ in streamer.calls]
    assert kinds[:2] == ["put", "verdict"] and "text" in kinds  # the prompt arrives, the verdict is given, then text
    assert streamer.calls[1] == ("verdict", {"judged": False, "reason": NOT_JUDGED_BEFORE_FIRST_TOKEN})
    assert streamer.safety_assessment is None
    with pytest.raises(ValueError, match="on_verdict must be a callable"):
        SafeLlavaTextStreamer(processor.tokenizer, on_verdict="print")
    with pytest.raises(TimeoutError, match="No safety verdict"):
        SafeLlavaTextIteratorStreamer(processor.tokenizer).wait_for_verdict(timeout=0.01)


def test_streaming_example_runs_top_to_bottom(capsys):
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).resolve().parent.parent / "examples" / "streaming.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[safety] not flagged")  # the verdict line is printed before the answer
    assert any(line.startswith("server: verdict refuse") for line in lines)
    assert any(line.startswith("server: streamed \"I'm sorry") for line in lines)
    assert any(line.startswith("pipeline threshold None: safety 'refuse'") for line in lines)
    assert any(line.startswith("pipeline threshold 1.0: safety {'judged': False") for line in lines)
