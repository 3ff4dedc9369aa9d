"""Safety decisions are reproducible: the same image and prompt get the same verdict whatever the batch around them,
the padding side, the order of the rows, or the call (the model is deterministic in eval mode).

The tiny model's random head gives every image a risk near 0.75; its attention and classifier weights are redrawn
larger here so that risks, levels and categories differ between images and the checks can see a row's verdict move.
"""

import pytest
import torch
from conftest import chat_prompt, random_image
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_safe_llava.tiny import build_tiny_safe_llava

QUESTIONS = ["Hi?", "What is shown in this image?", "Describe the picture in detail please, with many words.", "Read it."]
RISK_ATOL = 1e-5


def spread_head(model, seed: int = 0):
    """Redraws the safety head's weights so that verdicts differ between images (std 0.5 attention, 1.0 classifiers)."""
    generator = torch.Generator().manual_seed(seed)
    head = model.model.safety_module.head
    with torch.no_grad():
        for layer in (head.query_projection, head.key_projection, head.value_projection, head.output_projection):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.5)
        for layer in (head.level_classifier, head.category_classifier):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
            layer.bias.zero_()
    return model


@pytest.fixture(scope="module")
def judged_model():
    model, processor = build_tiny_safe_llava(seed=0)
    model.config.safety_modules_trained = True
    return spread_head(model), processor


def assess(model, processor, rows, threshold, padding_side="left"):
    """The assessment of a batch whose rows are `(image seed, question index)` pairs."""
    images = [random_image(seed) for seed, _ in rows]
    texts = [chat_prompt(processor, QUESTIONS[question]) for _, question in rows]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side=padding_side)
    return model.assess_safety(**inputs, safety_threshold=threshold)


def decisions(assessment, row):
    return (assessment.actions[row], int(assessment.level[row]), int(assessment.category[row]), bool(assessment.flagged[row]))


def assert_same_row(a, row_a, b, row_b, threshold):
    """Row `row_a` of `a` and row `row_b` of `b` carry the same verdict (risk within RISK_ATOL). A row whose risk is
    within RISK_ATOL of the threshold may legitimately flip its flag, so only its risk is compared."""
    risk_a, risk_b = float(a.risk[row_a]), float(b.risk[row_b])
    assert risk_a == pytest.approx(risk_b, abs=RISK_ATOL)
    assert torch.allclose(a.level_probs[row_a], b.level_probs[row_b], atol=RISK_ATOL)
    if abs(risk_a - threshold) > RISK_ATOL:
        assert decisions(a, row_a) == decisions(b, row_b)


batches = st.lists(st.tuples(st.integers(0, 40), st.integers(0, len(QUESTIONS) - 1)), min_size=1, max_size=3)


@settings(max_examples=15, deadline=None)
@given(rows=batches, threshold=st.floats(0.8, 0.95), data=st.data())
def test_decisions_ignore_batch_company_padding_side_and_order(judged_model, rows, threshold, data):
    model, processor = judged_model
    left = assess(model, processor, rows, threshold, "left")
    again = assess(model, processor, rows, threshold, "left")
    assert torch.equal(left.risk, again.risk) and left.actions == again.actions  # deterministic, bit for bit

    right = assess(model, processor, rows, threshold, "right")
    order = data.draw(st.permutations(range(len(rows))))
    shuffled = assess(model, processor, [rows[i] for i in order], threshold)
    for row in range(len(rows)):
        assert_same_row(left, row, right, row, threshold)
        assert_same_row(left, order[row], shuffled, row, threshold)
        alone = assess(model, processor, [rows[row]], threshold)
        assert_same_row(left, row, alone, 0, threshold)


def test_the_head_really_tells_images_apart(judged_model):
    """Guards the property test above against a head that gives every image the same verdict."""
    model, processor = judged_model
    assessment = assess(model, processor, [(seed, 0) for seed in range(8)], threshold=0.88)
    assert float(assessment.risk.max() - assessment.risk.min()) > 0.02
    assert len(set(assessment.actions)) > 1 and len(set(assessment.category.tolist())) > 1


def test_generate_reports_the_same_decisions_as_assess_safety(judged_model):
    model, processor = judged_model
    rows = [(1, 0), (2, 2), (3, 1)]
    threshold = 0.88
    direct = assess(model, processor, rows, threshold)
    images = [random_image(seed) for seed, _ in rows]
    texts = [chat_prompt(processor, QUESTIONS[question]) for _, question in rows]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    out = model.generate(
        **inputs, safety_threshold=threshold, max_new_tokens=1, do_sample=False, return_dict_in_generate=True
    )
    for row in range(len(rows)):
        assert_same_row(direct, row, out.safety_assessment, row, threshold)


def test_a_fresh_model_from_the_same_seed_decides_the_same(judged_model):
    """Reproducible across processes and runs: nothing depends on the global RNG or on state left by earlier calls."""
    model, processor = judged_model
    rows = [(4, 0), (5, 1), (6, 3)]
    before = assess(model, processor, rows, 0.88)
    torch.manual_seed(12345)  # the global RNG must not matter
    rebuilt, rebuilt_processor = build_tiny_safe_llava(seed=0)
    rebuilt.config.safety_modules_trained = True
    after = assess(spread_head(rebuilt), rebuilt_processor, rows, 0.88)
    assert torch.equal(before.risk, after.risk)
    assert [decisions(before, r) for r in range(3)] == [decisions(after, r) for r in range(3)]
