"""Quickstart, top to bottom: turn a stock LLaVA-1.5 into a SafeLlava, save it with its remote code, reload it
through the Auto classes, and generate with a safety threshold.

Offline, this uses the tiny random LLaVA of the tests. With network access, replace `build_tiny_llava()` by the
real checkpoint: `SafeLlavaForConditionalGeneration.from_llava("llava-hf/llava-1.5-7b-hf", ...)` and
`SafeLlavaProcessor.from_llava("llava-hf/llava-1.5-7b-hf", num_llm_safety_tokens=64)`.

    .venv/bin/python examples/quickstart.py
"""

import tempfile

from PIL import Image
from transformers import AutoModel, AutoProcessor

from modeling_safe_llava import SafeLlavaForConditionalGeneration, SafeLlavaProcessor, load_safety_policy
from modeling_safe_llava.tiny import build_tiny_llava, safety_fields

# 1. A stock LLaVA and its processor (tiny and random here).
llava, llava_processor = build_tiny_llava(seed=0)

# 2. SafeLlava around it: every stock weight kept, safety modules added (untrained), the paper's policy texts.
processor = SafeLlavaProcessor.from_llava(llava_processor, num_llm_safety_tokens=4)
model = SafeLlavaForConditionalGeneration.from_llava(
    llava, processor=processor, **safety_fields(), **load_safety_policy()
)
print("safety parameters:", sum(p.numel() for n, p in model.named_parameters() if "safety" in n))

# 3. Training the safety modules is stage 1 (examples/train_stage1.py). Untrained modules fail closed:
model.config.safety_modules_trained = True  # stands in for stage 1 in this quickstart only

# 4. Save with remote code and reload through the Auto classes.
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

# 5. Generate with a threshold; the verdict comes back with the answer.
prompt = processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}],
    add_generation_prompt=True,
)
inputs = processor(images=Image.new("RGB", (32, 32), "white"), text=prompt, return_tensors="pt")
for threshold in (0.9, 0.0):  # 1.0 turns safety off: stock generation, no verdict
    out = model.generate(**inputs, safety_threshold=threshold, max_new_tokens=12, return_dict_in_generate=True)
    verdict = out.safety_assessment.to_records()[0]
    answer = processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"threshold {threshold}: {verdict['action']:6s} {verdict['category_name']:12s} risk {verdict['risk']:.3f} -> {answer!r}")
