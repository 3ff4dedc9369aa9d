"""SafeLlavaForConditionalGeneration: equivalence with stock LLaVA, losses, gradients, save/load, conversion."""

import logging

import pytest
import torch
from conftest import chat_prompt, random_image

from modeling_safe_llava import SafeLlavaForConditionalGeneration, SafeLlavaProcessor
from modeling_safe_llava.modeling_safe_llava import SAFETY_PARAMETER_PREFIXES
from modeling_safe_llava.tiny import safety_fields


def batch(processor, num_rows=2, seed=0):
    images = [random_image(seed + i) for i in range(num_rows)]
    texts = [chat_prompt(processor, q) for q in ["What is shown in this image?", "Describe the picture."][:num_rows]]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def safety_parameter_names(model):
    return [name for name, _ in model.named_parameters() if name.startswith(SAFETY_PARAMETER_PREFIXES)]


def test_zero_llm_safety_tokens_matches_stock_llava(tiny_llava):
    llava, llava_processor = tiny_llava
    fields = {**safety_fields(), "num_llm_safety_tokens": 0}
    model = SafeLlavaForConditionalGeneration.from_llava(llava, **fields).eval()
    processor = SafeLlavaProcessor.from_llava(llava_processor, num_llm_safety_tokens=0)
    inputs = batch(processor)
    with torch.no_grad():
        stock_logits = llava(**inputs).logits
        safe_logits = model(**inputs).logits
    assert (stock_logits - safe_logits).abs().max().item() <= 1e-5

    model.config.safety_modules_trained = True
    stock_tokens = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
    safe_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False, safety_threshold=1.0)
    assert torch.equal(stock_tokens, safe_tokens)


def test_from_llava_keeps_every_stock_weight_bit_identical(tiny_llava):
    llava, _ = tiny_llava
    model = SafeLlavaForConditionalGeneration.from_llava(llava, **safety_fields())
    safe_state = model.state_dict()
    for name, tensor in llava.state_dict().items():
        assert torch.equal(safe_state[name], tensor), name
    assert set(safe_state) - set(llava.state_dict()) == set(safety_parameter_names(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.config.safety_modules_trained is False


def test_from_llava_checkpoint_folder_maps_stock_keys_including_lm_head(tiny_llava, tmp_path):
    llava, llava_processor = tiny_llava
    llava.save_pretrained(tmp_path)
    llava_processor.save_pretrained(tmp_path)
    model = SafeLlavaForConditionalGeneration.from_llava(str(tmp_path), **safety_fields())
    assert torch.equal(model.lm_head.weight, llava.lm_head.weight)
    for name, tensor in llava.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.generation_config.safety_threshold == model.config.safety_threshold


def test_losses_and_weighted_sum(tiny_safe_llava):
    model, processor = tiny_safe_llava
    inputs = batch(processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    safety_labels = torch.tensor([[3, 1], [0, 6]])
    out = model(**inputs, labels=labels, safety_labels=safety_labels)
    expected_safety = torch.nn.functional.cross_entropy(out.safety_level_logits, safety_labels[:, 0]) + (
        torch.nn.functional.cross_entropy(out.safety_type_logits, safety_labels[:, 1])
    )
    assert torch.allclose(out.safety_loss, expected_safety)
    assert torch.allclose(out.loss, out.lm_loss + model.config.safety_loss_weight * out.safety_loss)
    assert model(**inputs, labels=labels).loss.item() == pytest.approx(out.lm_loss.item(), rel=1e-6)
    assert model(**inputs, safety_labels=safety_labels).loss.item() == pytest.approx(
        10.0 * out.safety_loss.item(), rel=1e-5
    )


def test_unlabelled_rows_add_no_safety_loss(tiny_safe_llava):
    model, processor = tiny_safe_llava
    inputs = batch(processor)
    only_first = model(**inputs, safety_labels=torch.tensor([[2, 4], [-100, -100]])).safety_loss
    first_row_inputs = {k: v[:1] for k, v in inputs.items()}
    alone = model(**first_row_inputs, safety_labels=torch.tensor([[2, 4]])).safety_loss
    assert torch.allclose(only_first, alone, atol=1e-5)
    none_labelled = model(**inputs, safety_labels=torch.full((2, 2), -100))
    assert none_labelled.safety_loss.item() == 0.0


def test_gradients_reach_every_safety_module(tiny_safe_llava):
    model, processor = tiny_safe_llava
    inputs = batch(processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model(**inputs, labels=labels, safety_labels=torch.tensor([[3, 1], [0, 6]])).loss.backward()
    for name in safety_parameter_names(model):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_llm_safety_tokens_sit_before_each_images_features(tiny_safe_llava):
    model, processor = tiny_safe_llava
    inputs = batch(processor, num_rows=1)
    features = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]  # what fills the placeholders
    n = model.config.num_llm_safety_tokens
    assert torch.equal(features[:n], model.model.safety_module.llm_tokens.detach())
    assert features.shape[0] == model.config.image_seq_length


def test_save_and_reload_change_no_output(tiny_safe_llava, tmp_path):
    model, processor = tiny_safe_llava
    model.config.safety_modules_trained = True
    inputs = batch(processor)
    model.save_pretrained(tmp_path)
    reloaded = SafeLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        before, after = model(**inputs), reloaded(**inputs)
    for field in ("logits", "safety_level_logits", "safety_type_logits"):
        assert (getattr(before, field) - getattr(after, field)).abs().max().item() <= 1e-5
    assert reloaded.config.safety_modules_trained is True
    assert (tmp_path / "model.safetensors").is_file()


def test_checkpoints_keep_the_flat_safety_names_so_old_and_new_checkpoints_load_alike(tiny_safe_llava, tmp_path):
    """In memory the safety parameters sit under one module (`model.safety_module.*`); on disk they keep the names
    checkpoints have always had (`model.safety_head.*`, `model.safety_tokens`, ...), through the conversion mapping."""
    from safetensors import safe_open

    model, _ = tiny_safe_llava
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        saved = set(weights.keys())
    in_memory = {name for name in model.state_dict() if name.startswith("model.safety_module.")}
    assert {"model.safety_tokens", "model.llm_safety_tokens"} <= saved
    assert any(name.startswith("model.safety_head.") for name in saved)
    assert any(name.startswith("model.safety_projector.") for name in saved)
    assert not any(name.startswith("model.safety_module.") for name in saved)
    legacy = {
        name.replace("model.safety_module.tokens", "model.safety_tokens")
        .replace("model.safety_module.llm_tokens", "model.llm_safety_tokens")
        .replace("model.safety_module.head.", "model.safety_head.")
        .replace("model.safety_module.projector.", "model.safety_projector.")
        .replace("_projection.", "_proj.")
        .replace("safety_head.query_proj", "safety_head.q_proj")
        .replace("safety_head.key_proj", "safety_head.k_proj")
        .replace("safety_head.value_proj", "safety_head.v_proj")
        .replace("safety_head.output_proj", "safety_head.o_proj")
        for name in in_memory
    }
    assert legacy <= saved
    reloaded, info = SafeLlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_checkpoint_without_safety_weights_is_initialised_and_warned(tiny_llava, tmp_path, caplog):
    llava, _ = tiny_llava
    model = SafeLlavaForConditionalGeneration.from_llava(llava, **safety_fields())
    model.config.safety_modules_trained = True  # a config that claims training, weights that do not exist
    model.config.save_pretrained(tmp_path)
    llava.save_pretrained(tmp_path / "llava")
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "llava" / "model.safetensors").read_bytes())
    with caplog.at_level(logging.WARNING):
        loaded = SafeLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert loaded.model.safety_module.tokens.abs().max() < 1.0  # normal(0, 0.02), not leftover memory
    assert "model.safety_module.tokens" in caplog.text and "untrained" in caplog.text
    assert loaded.config.safety_modules_trained is False  # fails closed


def test_mlp_projector_variant_trains(tiny_llava):
    llava, llava_processor = tiny_llava
    model = SafeLlavaForConditionalGeneration.from_llava(llava, **{**safety_fields(), "safety_projector_type": "mlp"})
    processor = SafeLlavaProcessor.from_llava(llava_processor, num_llm_safety_tokens=model.config.num_llm_safety_tokens)
    out = model(**batch(processor), safety_labels=torch.tensor([[1, 1], [0, 6]]))
    out.loss.backward()
    assert model.model.safety_module.projector.linear_1.weight.grad.abs().sum() > 0


def test_wrong_image_token_count_raises(tiny_safe_llava, tiny_llava):
    model, _ = tiny_safe_llava
    _, stock_processor = tiny_llava  # expands <image> without room for the LLM safety tokens
    inputs = stock_processor(images=[random_image(0)], text=["USER: <image>\nHi ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**inputs)


@pytest.mark.parametrize(
    "labels, fragment",
    [
        (torch.tensor([1, 2]), "shape (batch_size, 2) = (2, 2)"),
        (torch.tensor([[1, 2, 3], [0, 0, 0]]), "got (2, 3)"),
        (torch.tensor([[1.0, 2.0], [0.0, 6.0]]), "must be an integer tensor"),
        (torch.tensor([[4, 0], [0, 6]]), "safety level labels must be in [0, 3] or -100, got [4]"),
        (torch.tensor([[1, 7], [0, 6]]), "safety type labels must be in [0, 6] or -100, got [7]"),
    ],
)
def test_bad_safety_labels_raise(tiny_safe_llava, labels, fragment):
    model, processor = tiny_safe_llava
    with pytest.raises(ValueError) as error:
        model(**batch(processor), safety_labels=labels)
    assert fragment in str(error.value)


def test_safety_labels_without_images_raise(tiny_safe_llava):
    model, processor = tiny_safe_llava
    ids = processor.tokenizer(["USER: Hi ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match="safety_labels were given without pixel_values"):
        model(**ids, safety_labels=torch.tensor([[0, 6]]))


def test_riskiest_image_decides_a_multi_image_row(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    images = [random_image(10), random_image(11)]
    singles = [
        model.assess_safety(**processor(images=[img], text=[chat_prompt(processor)], return_tensors="pt"))
        for img in images
    ]
    both = model.assess_safety(
        **processor(images=images, text=[chat_prompt(processor, images=2)], return_tensors="pt")
    )
    riskiest = max(range(2), key=lambda i: singles[i].risk.item())
    assert both.risk.item() == pytest.approx(singles[riskiest].risk.item(), abs=1e-5)
    assert both.images_per_row.tolist() == [2]


def test_safety_forward_matches_forward_without_running_the_language_model(tiny_safe_llava):
    model, processor = tiny_safe_llava
    inputs = batch(processor)
    safety_labels = torch.tensor([[3, 1], [0, 6]])
    full = model(**inputs, safety_labels=safety_labels)
    calls = []
    handle = model.model.language_model.register_forward_hook(lambda *a: calls.append(1))
    alone = model.safety_forward(**inputs, safety_labels=safety_labels)
    handle.remove()
    assert calls == []
    assert torch.allclose(alone.safety_level_logits, full.safety_level_logits, atol=1e-6)
    assert torch.allclose(alone.loss, model.config.safety_loss_weight * full.safety_loss, atol=1e-5)
    alone.loss.backward()
    assert model.model.safety_module.head.level_classifier.weight.grad.abs().sum() > 0


def test_weights_a_checkpoint_lacks_are_initialised_as_in_init(tiny_safe_llava, monkeypatch):
    """Meta-device loading then `_init_weights` gives the weights `__init__` gives (CLIP's own attention and MLP init
    included), as for stock LLaVA; each module's init is seeded so that both paths draw the same numbers."""
    import copy

    from transformers import PreTrainedModel, set_seed

    model, _ = tiny_safe_llava
    original = PreTrainedModel._initialize_weights

    def seeded(*args, **kwargs):
        set_seed(42)
        original(*args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)
    from_init = SafeLlavaForConditionalGeneration(copy.deepcopy(model.config)).state_dict()
    from_meta = SafeLlavaForConditionalGeneration.from_pretrained(
        None, config=copy.deepcopy(model.config), state_dict={}
    ).state_dict()
    differing = [name for name in from_init if not torch.equal(from_init[name], from_meta[name])]
    assert differing == []
