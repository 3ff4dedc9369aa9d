"""Stage 2 of SafeLlava (arXiv 2405.13581): LoRA on the stage-1 model's language model, stock transformers.Trainer.

Every flag is listed by `python examples/train_stage2.py --help`; the recipe's values are the defaults.

    # Offline demo, after `python examples/train_stage1.py --output_dir outputs/stage1`
    python examples/train_stage2.py --model_name_or_path outputs/stage1 --output_dir outputs/stage2 --merge_adapter

    # The paper's 7B stage 2 (LoRA r 256, alpha 16, dropout 0.05; safety modules frozen)
    python examples/train_stage2.py --recipe recipe_stage2_7b.json \
        --model_name_or_path outputs/stage1_7b --dtype bfloat16 \
        --train_file data/stage2.jsonl --output_dir outputs/stage2_7b

    # Several GPUs, as in the paper (DeepSpeed ZeRO-2; `pip install deepspeed`)
    torchrun --nproc_per_node 8 examples/train_stage2.py --recipe recipe_stage2_7b.json ... \
        --deepspeed configuration/deepspeed_zero2.json
    accelerate launch --multi_gpu --num_processes 8 examples/train_stage2.py --recipe recipe_stage2_7b.json ...

    # After an interruption: the same command plus
    --resume_from_checkpoint latest

The output folder holds the LoRA adapter (adapter_config.json, adapter_model.safetensors) and the processor; with
--merge_adapter also a merged full model in <output_dir>/merged. The stage-1 weights are not in the adapter: load
it on the stage-1 model (`modeling_safe_llava.training.load_stage2_model(stage1_folder, output_dir)`).
"""

from accelerate import PartialState

from modeling_safe_llava.training import (
    load_model_and_processor,
    parse_command_line,
    synthetic_safety_records,
    train_stage2,
)


model_args, recipe, overrides = parse_command_line(stage=2)
output_dir = overrides.pop("output_dir", "outputs/stage2")
train_file = overrides.pop("train_file", None)
eval_file = overrides.pop("eval_file", None)
synthetic_rows = overrides.pop("synthetic_rows", 64)

model, processor = load_model_and_processor(model_args, stage=2)

# Without --train_file: a small built-in synthetic dataset (coloured squares), so the script runs offline.
train_data = train_file if train_file is not None else synthetic_safety_records(synthetic_rows, seed=0)
eval_data = eval_file

model = train_stage2(model, processor, train_data, output_dir, recipe=recipe, eval_dataset=eval_data, **overrides)

if PartialState().is_main_process:  # under torchrun / accelerate launch, one summary rather than one per rank
    print(f"Stage 2 done: LoRA adapter saved in {output_dir}")
    if overrides.get("merge_adapter"):
        print(f"Merged model saved in {output_dir}/merged")
