"""Stage 1 of SafeLlava (arXiv 2405.13581): train only the safety modules with the stock transformers.Trainer.

Every flag is listed by `python examples/train_stage1.py --help`; the recipe's values are the defaults.

    # Offline demo: tiny random model, built-in synthetic data, CPU, a few seconds
    python examples/train_stage1.py --output_dir outputs/stage1

    # The paper's 7B stage 1 from a stock LLaVA-1.5 checkpoint, on your risk data
    python examples/train_stage1.py --recipe recipe_stage1_7b.json \
        --model_name_or_path llava-hf/llava-1.5-7b-hf --dtype bfloat16 \
        --train_file data/stage1.jsonl --output_dir outputs/stage1_7b

    # Several GPUs, as in the paper (DeepSpeed ZeRO-2; `pip install deepspeed`)
    torchrun --nproc_per_node 4 examples/train_stage1.py --recipe recipe_stage1_7b.json ... \
        --deepspeed configuration/deepspeed_zero2.json
    accelerate launch --multi_gpu --num_processes 4 examples/train_stage1.py --recipe recipe_stage1_7b.json ...

    # After an interruption: the same command plus
    --resume_from_checkpoint latest

The output folder holds a full SafeLlava (safetensors, remote code, processor) with
`config.safety_modules_trained = True`; stage 2 (examples/train_stage2.py) starts from it.
"""

from accelerate import PartialState

from modeling_safe_llava.training import (
    load_model_and_processor,
    parse_command_line,
    synthetic_safety_records,
    train_stage1,
)


model_args, recipe, overrides = parse_command_line(stage=1)
output_dir = overrides.pop("output_dir", "outputs/stage1")
train_file = overrides.pop("train_file", None)
eval_file = overrides.pop("eval_file", None)
synthetic_rows = overrides.pop("synthetic_rows", 64)

model, processor = load_model_and_processor(model_args, stage=1)

# Without --train_file: a small built-in synthetic dataset (coloured squares), so the script runs offline.
train_data = train_file if train_file is not None else synthetic_safety_records(synthetic_rows, seed=0)
eval_data = eval_file if eval_file is not None or train_file is not None else synthetic_safety_records(16, seed=1)

model = train_stage1(model, processor, train_data, output_dir, recipe=recipe, eval_dataset=eval_data, **overrides)

if PartialState().is_main_process:  # under torchrun / accelerate launch, one summary rather than one per rank
    print(f"Stage 1 done: SafeLlava with trained safety modules saved in {output_dir}")
    print(f"Next: python examples/train_stage2.py --model_name_or_path {output_dir} --output_dir <stage-2 folder>")
