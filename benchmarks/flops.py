"""Parameter and FLOP accounting, on the meta device (no memory, no compute) or on real tensors.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which derives them from operator shapes, so it works on
meta tensors. A whole `model(...)` call cannot run on meta (SafeLlava's placeholder check reads tensor values), so
the count is taken per module: vision tower, LLaVA's projector, safety projector, safety head, language model
prefill, one decode step, lm_head. `verify_flop_counts` checks on real tensors that (1) every component counts the
same on meta as on the real device and (2) the components add up to the FlopCounterMode count of the full forward
of stock LLaVA and of SafeLlava, i.e. nothing is missed.

FLOPs are counted the FlopCounterMode way: 2 per multiply-accumulate; attention scores over the full (not causal)
square, as the kernels' shapes say.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from modeling_safe_llava.modeling_safe_llava import SAFETY_PARAMETER_PREFIXES


# PyTorch's CPU attention kernel has no FLOP formula in FlopCounterMode (it would count 0): give it the one of the
# CUDA flash kernel, which has the same inputs. On meta, attention decomposes into matmuls and is counted as such.
def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(fn) -> tuple[int, object]:
    """`(flops, fn())` under FlopCounterMode (CPU attention included)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        result = fn()
    return counter.get_total_flops(), result


def count_parameters(stock, safe) -> dict:
    """Parameter counts of stock LLaVA and SafeLlava (works on meta): totals and the safety modules' share."""
    named = dict(safe.named_parameters())
    safety = {name: p.numel() for name, p in named.items() if name.startswith(SAFETY_PARAMETER_PREFIXES)}
    by_module = {}
    for name, count in safety.items():
        module = name.split(".")[1]  # model.<module>...
        by_module[module] = by_module.get(module, 0) + count
    stock_total = sum(p.numel() for p in stock.parameters())
    safe_total = sum(p.numel() for p in named.values())
    safety_total = sum(safety.values())
    return {
        "stock_total": stock_total,
        "safe_total": safe_total,
        "safety_total": safety_total,
        "safety_by_module": by_module,
        "safety_share_of_stock": safety_total / stock_total,
        "safety_share_of_safe": safety_total / safe_total,
        "non_safety_params_match_stock": safe_total - safety_total == stock_total,
    }


def _empty(device, dtype, *shape):
    return torch.zeros(*shape, device=device, dtype=dtype)


@torch.no_grad()  # on real tensors, autograd would keep every layer's activations (gigabytes at the 7B shape)
def component_flops(stock, safe, num_text_tokens: int, new_tokens: int, device: str = "meta") -> dict:
    """
    FLOPs of one row (one image) per component, counted on `device` with zero inputs of the right shapes.

    `stock` and `safe` must hold the same LLaVA shapes; `safe` supplies the safety modules and the LLM safety token
    count. Decode sums the `new_tokens - 1` steps after prefill (the KV cache grows by one each step; a step's FLOPs
    are linear in the cache length, so two counted steps give the exact sum).
    """
    config = safe.config
    dtype = next(safe.parameters()).dtype
    hidden = config.text_config.hidden_size
    size = config.vision_config.image_size
    language_model = stock.model.language_model
    flops = {}
    flops["vision_tower"], vision = count_flops(
        lambda: stock.model.vision_tower(_empty(device, dtype, 1, 3, size, size), output_hidden_states=True)
    )
    vision_states = safe.model.safety_vision_states(vision)  # (1, grid_h, grid_w, vision_dim)
    features = vision_states.flatten(1, 2)
    num_patches = features.shape[1]
    flops["llava_projector"], _ = count_flops(lambda: stock.model.multi_modal_projector(features))
    flops["safety_projector"], _ = count_flops(lambda: safe.model.safety_module.projector(vision_states))
    keys = _empty(device, dtype, 1, config.num_safety_tokens + num_patches, hidden)
    flops["safety_head"], _ = count_flops(lambda: safe.model.safety_module.head(_empty(device, dtype, 1, hidden), keys))
    flops["lm_head_per_token"], _ = count_flops(lambda: stock.lm_head(_empty(device, dtype, 1, 1, hidden)))
    stock_length = num_text_tokens + num_patches
    for name, length in (("stock", stock_length), ("safe", stock_length + config.num_llm_safety_tokens)):
        flops[f"llm_prefill_{name}"], _ = count_flops(
            lambda: language_model(inputs_embeds=_empty(device, dtype, 1, length, hidden), use_cache=True)
        )
        flops[f"llm_decode_{name}"] = _decode_flops(language_model, length, new_tokens - 1, hidden, device, dtype)
    flops["sequence_length_stock"] = stock_length
    flops["sequence_length_safe"] = stock_length + config.num_llm_safety_tokens
    return flops


def _decode_flops(language_model, prompt_length, steps, hidden, device, dtype) -> int:
    """
    Sum of the language model's FLOPs over `steps` one-token decode steps after a `prompt_length` prefill. A step's
    count is linear in the cache length: two steps give the slope, a third (the last) checks the linearity.
    """
    if steps <= 0:
        return 0

    def step_at(cache_length):
        with torch.no_grad():
            cache = language_model(inputs_embeds=_empty(device, dtype, 1, cache_length, hidden), use_cache=True)
            flops, _ = count_flops(
                lambda: language_model(
                    inputs_embeds=_empty(device, dtype, 1, 1, hidden),
                    past_key_values=cache.past_key_values,
                    use_cache=True,
                )
            )
        return flops

    first = step_at(prompt_length)
    if steps == 1:
        return first
    slope = step_at(prompt_length + 1) - first
    last = step_at(prompt_length + steps - 1)
    if last != first + slope * (steps - 1):
        raise RuntimeError(f"Decode FLOPs are not linear in the cache length: {first}, +{slope}/token, last {last}.")
    return steps * first + slope * steps * (steps - 1) // 2


def derived_flops(c: dict, new_tokens: int) -> dict:
    """Per-row totals of every benchmarked call, and their ratios, from `component_flops`."""
    safety = c["safety_projector"] + c["safety_head"]
    encode = c["vision_tower"] + c["llava_projector"]
    tail = (new_tokens - 1) * c["lm_head_per_token"]
    totals = {
        "stock_prefill": encode + c["llm_prefill_stock"] + c["lm_head_per_token"],
        "safe_prefill": encode + safety + c["llm_prefill_safe"] + c["lm_head_per_token"],
        "head_only_prefill": encode + safety + c["llm_prefill_stock"] + c["lm_head_per_token"],
        "assess_safety": encode + safety,
    }
    totals["stock_generate"] = totals["stock_prefill"] + c["llm_decode_stock"] + tail
    totals["safe_generate"] = totals["safe_prefill"] + c["llm_decode_safe"] + tail
    totals["head_only_generate"] = totals["head_only_prefill"] + c["llm_decode_stock"] + tail
    totals["paper_way_generate"] = totals["assess_safety"] + totals["safe_generate"]
    ratios = {
        "prefill_safe_vs_stock": totals["safe_prefill"] / totals["stock_prefill"],
        "prefill_head_only_vs_stock": totals["head_only_prefill"] / totals["stock_prefill"],
        "generate_safe_vs_stock": totals["safe_generate"] / totals["stock_generate"],
        "generate_head_only_vs_stock": totals["head_only_generate"] / totals["stock_generate"],
        "paper_way_vs_ours": totals["paper_way_generate"] / totals["safe_generate"],
        "refused_vs_full_generate": totals["assess_safety"] / totals["safe_generate"],
        "full_forward_vs_assess": totals["stock_prefill"] / totals["assess_safety"],
    }
    generate = totals["stock_generate"] + safety  # stock generation plus the safety modules, no LLM safety tokens
    shares = {
        "vision_tower": c["vision_tower"] / generate,
        "llava_projector": c["llava_projector"] / generate,
        "llm_prefill": (c["llm_prefill_stock"] + c["lm_head_per_token"]) / generate,
        "llm_decode": (c["llm_decode_stock"] + tail) / generate,
        "safety_projector": c["safety_projector"] / generate,
        "safety_head": c["safety_head"] / generate,
        "llm_prefill_growth_from_llm_safety_tokens": c["llm_prefill_safe"] / c["llm_prefill_stock"] - 1.0,
    }
    return {"totals": totals, "ratios": ratios, "shares_of_generate": shares}


def flop_report(stock, safe, num_text_tokens: int, new_tokens: int, device: str = "meta") -> dict:
    components = component_flops(stock, safe, num_text_tokens, new_tokens, device)
    return {"components": components, **derived_flops(components, new_tokens)}


def verify_flop_counts(stock, safe, inputs_stock: dict, inputs_safe: dict, meta_flops: dict, new_tokens: int) -> dict:
    """
    On real models and batch-1 inputs: the components counted on the real device equal the meta counts
    (`meta_flops["components"]` from `flop_report(..., device="meta")` for the same shapes), and they add up to the
    FlopCounterMode count of the full forward of each model.
    """
    device = str(stock.device)
    meta_components = meta_flops["components"]
    num_text_tokens = meta_components["sequence_length_stock"] - _num_patches(safe)
    real = component_flops(stock, safe, num_text_tokens, new_tokens, device)
    derived = derived_flops(real, new_tokens)["totals"]
    with torch.no_grad():
        stock_forward, _ = count_flops(lambda: stock(**inputs_stock, logits_to_keep=1))
        safe_forward, _ = count_flops(lambda: safe(**inputs_safe, logits_to_keep=1))
    return {
        "device": device,
        "meta_equals_real": real == meta_components,
        "stock_forward_counted": stock_forward,
        "stock_forward_from_components": derived["stock_prefill"],
        "safe_forward_counted": safe_forward,
        "safe_forward_from_components": derived["safe_prefill"],
        "components_add_up": stock_forward == derived["stock_prefill"] and safe_forward == derived["safe_prefill"],
    }


def _num_patches(model) -> int:
    config = model.config
    return config.image_seq_length - config.num_llm_safety_tokens


def analytic_generate_memory(stock, safe, num_text_tokens: int, new_tokens: int, batch_sizes, bytes_per_value: int) -> dict:
    """
    Estimated peak memory of `generate` at a model shape (works on meta): weights, plus the KV cache at the last
    step, plus the vision tower's hidden states that `generate` keeps for the whole call. Activations of single
    layers (smaller than the KV cache at these sizes) are left out, so the ratios slightly overstate the overhead.
    Bytes per value: 2 for bf16.
    """
    text, vision = safe.config.text_config, safe.config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_position = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * bytes_per_value
    patches = (vision.image_size // vision.patch_size) ** 2
    vision_states = (vision.num_hidden_layers + 1) * (patches + 1) * vision.hidden_size * bytes_per_value
    safety = sum(p.numel() for n, p in safe.named_parameters() if n.startswith(SAFETY_PARAMETER_PREFIXES))
    llm_tokens = safe.model.safety_module.llm_tokens.numel() if safe.model.safety_module.llm_tokens is not None else 0
    stock_weights = sum(p.numel() for p in stock.parameters()) * bytes_per_value
    weights = {
        "stock": stock_weights,
        "safe": stock_weights + safety * bytes_per_value,
        "head_only": stock_weights + (safety - llm_tokens) * bytes_per_value,
    }
    positions = {
        "stock": num_text_tokens + patches + new_tokens,
        "safe": num_text_tokens + patches + safe.config.num_llm_safety_tokens + new_tokens,
        "head_only": num_text_tokens + patches + new_tokens,
    }
    results = {}
    for batch in batch_sizes:
        totals = {
            name: weights[name] + batch * (positions[name] * kv_per_position + vision_states) for name in weights
        }
        results[f"batch_{batch}"] = {
            "bytes": totals,
            "safe_vs_stock": totals["safe"] / totals["stock"],
            "head_only_vs_stock": totals["head_only"] / totals["stock"],
        }
    return {"bytes_per_value": bytes_per_value, "by_batch": results}
