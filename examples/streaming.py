"""Streaming with the verdict first, and the pipeline with a `safety` entry, top to bottom.

1. `SafeLlavaTextStreamer`: prints the verdict line, then the answer as it is generated.
2. `SafeLlavaTextIteratorStreamer`: a web server's loop; the verdict is known before the first chunk is sent, and a
   refused image streams its refusal as text.
3. `pipeline("image-text-to-text", model=folder, trust_remote_code=True)` on an exported folder: each output has
   `generated_text` and `safety`.

Offline, this uses the tiny random SafeLlava of the tests; its verdict on the refused image is forced by setting the
safety head's bias (a trained head decides by itself). Replace `build_tiny_safe_llava()` by a trained checkpoint
(`AutoModel.from_pretrained(..., trust_remote_code=True)`) for real answers.

    .venv/bin/python examples/streaming.py
"""

import tempfile
from pathlib import Path
from threading import Thread

import torch
from PIL import Image
from transformers import pipeline

from modeling_safe_llava.tiny import build_tiny_safe_llava
from modeling_safe_llava.tools.hub import export_for_hub
from modeling_safe_llava.tools.streaming import SafeLlavaTextIteratorStreamer, SafeLlavaTextStreamer

model, processor = build_tiny_safe_llava(seed=0)
model.config.safety_modules_trained = True  # stands in for stage 1 in this example only
prompt = processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}],
    add_generation_prompt=True,
)
inputs = processor(images=Image.new("RGB", (32, 32), "white"), text=prompt, return_tensors="pt")

# 1. Console: the verdict line, then the answer (threshold 0.9: the tiny head's risk of about 0.75 is allowed).
streamer = SafeLlavaTextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
model.generate(**inputs, streamer=streamer, safety_threshold=0.9, max_new_tokens=12, do_sample=False)
print("verdict as a dict:", {key: streamer.safety[key] for key in ("flagged", "action", "category_name")})


# 2. A server loop. Force "level 3, Illegal Risk" (the paper's policy refuses it) through the head's bias.
def force_verdict(model, level: int, type_index: int):
    for name, module in model.named_modules():
        for suffix, index in (("level_classifier", level), ("category_classifier", type_index)):
            if name.endswith(suffix):
                with torch.no_grad():
                    module.weight.zero_()
                    module.bias.copy_(torch.nn.functional.one_hot(torch.tensor(index), module.out_features) * 20.0)


force_verdict(model, level=3, type_index=model.config.safety_type_labels.index("Illegal Risk"))
streamer = SafeLlavaTextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
thread = Thread(target=model.generate, kwargs={**inputs, "streamer": streamer, "max_new_tokens": 64})
thread.start()
safety = streamer.wait_for_verdict(timeout=60)  # before any text: decide how to show the answer
print(f"server: verdict {safety['action']} ({safety['category_name']}, risk {safety['risk']:.2f}) before the first chunk")
chunks = list(streamer)
thread.join()
print("server: streamed", repr("".join(chunks)))

# 3. The pipeline of an exported folder (remote code; no package needed where it is loaded).
with tempfile.TemporaryDirectory() as tmp:
    folder = export_for_hub(model, processor, Path(tmp) / "safe-llava-tiny")
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (32, 32), "white")},
                                         {"type": "text", "text": "What is shown here?"}]}]  # fmt: skip
    for threshold in (None, 1.0):  # None: the model's default; 1.0: safety off
        (output,) = pipe(text=chat, max_new_tokens=64, safety_threshold=threshold, return_full_text=False)
        print(f"pipeline threshold {threshold}: safety {output['safety'].get('action', output['safety'])!r}, "
              f"text {output['generated_text']!r}")  # fmt: skip
