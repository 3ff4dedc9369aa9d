# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""SafeLlava's `image-text-to-text` pipeline: stock's answers, each with the safety verdict beside it.

A saved SafeLlava folder names this class in `config.json` (`custom_pipelines`), so that

```python
>>> from transformers import pipeline
>>> pipe = pipeline("image-text-to-text", model="exports/safe-llava", trust_remote_code=True)
>>> out = pipe(images="photo.png", text=prompt, safety_threshold=0.3, max_new_tokens=32)
>>> out[0]["generated_text"], out[0]["safety"]["flagged"], out[0]["safety"]["action"]
```

returns, for each generated text, everything the stock pipeline returns plus a `safety` entry (see
[`safety_entries`]). `safety_threshold` and `safety_actions` are call (or constructor) arguments, passed on to
`model.generate` as in a direct call.

This file is remote code: it imports only torch and transformers, and reads or writes nothing itself.
"""

from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline, ReturnType


# What `pipeline()` reads from `config.json` to pick this class (`transformers.pipelines.pipeline`: custom tasks).
CUSTOM_PIPELINES = {
    "image-text-to-text": {
        "impl": "pipeline_safe_llava.SafeLlavaImageTextToTextPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    }
}
NOT_JUDGED_SAFETY_OFF = "safety is off (safety_threshold=1.0, or a model without a safety head): no verdict was made"
NOT_JUDGED_NO_IMAGE = "no image in this input: nothing was judged"


def safety_entries(assessment, num_rows: int | None = None) -> list[dict]:
    """
    One `safety` entry per row of a `generate` call.

    Args:
        assessment (`SafeLlavaSafetyAssessment` or `None`): `output.safety_assessment` of `model.generate(...,
            return_dict_in_generate=True)`; `None` (the attribute is absent) when safety is off.
        num_rows (`int`, *optional*): rows of the call, needed when `assessment` is `None`.

    Returns:
        `list[dict]`: a judged row gets `{"judged": True, **assessment.to_records()[row]}` (risk, flagged,
        threshold, level, level_name, category, category_name, action, level_probs, type_probs). A row that was not
        judged gets `{"judged": False, "reason": ...}`: when safety is off, and for a row without an image (then
        `images_per_row` is 0, or None for a text-only call).
    """
    if assessment is None:
        if num_rows is None:
            raise ValueError("safety_entries needs num_rows when there is no assessment (safety off).")
        return [{"judged": False, "reason": NOT_JUDGED_SAFETY_OFF} for _ in range(num_rows)]
    images_per_row = assessment.images_per_row  # None: a text-only call, nothing judged
    entries = []
    for row, record in enumerate(assessment.to_records()):
        if images_per_row is None or int(images_per_row[row]) == 0:
            entries.append({"judged": False, "reason": NOT_JUDGED_NO_IMAGE})
        else:
            entries.append({"judged": True, **record})
    return entries


class SafeLlavaImageTextToTextPipeline(ImageTextToTextPipeline):
    """
    Stock [`ImageTextToTextPipeline`] (same inputs: chat messages with images as path, URL or PIL image, or `images=`
    plus `text=`; same outputs), plus a `safety` entry in each output dict (see [`safety_entries`]).

    Extra call (or constructor) arguments:
        safety_threshold (`float` or `dict`, *optional*): as `model.generate`'s; `1.0` turns safety off (then every
            entry is `{"judged": False, "reason": ...}`). Default: the model's generation config.
        safety_actions (`dict`, *optional*): as `model.generate`'s, `{risky type name: action or list of 4}`.
    """

    def _sanitize_parameters(self, safety_threshold=None, safety_actions=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if safety_threshold is not None:
            forward_params["safety_threshold"] = safety_threshold
        if safety_actions is not None:
            forward_params["safety_actions"] = safety_actions
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, generate_kwargs=None, **safety_kwargs):
        """Stock `_forward` with `return_dict_in_generate=True`: the sequences, plus one `safety` entry per row."""
        generate_kwargs = {} if generate_kwargs is None else generate_kwargs
        prompt_text = model_inputs.pop("text")
        input_ids = model_inputs["input_ids"] if "input_ids" in model_inputs else model_inputs["decoder_input_ids"]
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs, return_dict_in_generate=True)
        output = self.model.generate(**model_inputs, **generate_kwargs, **safety_kwargs)
        sequences = output.sequences
        if input_ids is not None and sequences.ndim == 2 and sequences.shape[0] > input_ids.shape[0]:
            sequences = sequences.reshape(input_ids.shape[0], -1, sequences.shape[-1])
        safety = safety_entries(getattr(output, "safety_assessment", None), num_rows=input_ids.shape[0])
        return {"generated_sequence": sequences, "prompt_text": prompt_text, "input_ids": input_ids, "safety": safety}

    def postprocess(self, model_outputs, return_type=ReturnType.FULL_TEXT, **postprocess_kwargs):
        """Stock records, each with its row's `safety` entry (every returned sequence of a row shares it)."""
        safety = model_outputs["safety"]
        safety = [safety] if isinstance(safety, dict) else list(safety)  # a batched pipeline hands one row's dict
        records = super().postprocess(model_outputs, return_type=return_type, **postprocess_kwargs)
        per_row = len(records) // len(safety)
        for i, record in enumerate(records):
            record["safety"] = dict(safety[i // per_row])
        return records


__all__ = ["SafeLlavaImageTextToTextPipeline", "safety_entries", "CUSTOM_PIPELINES"]
