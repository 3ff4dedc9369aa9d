"""Training beyond one process, on CPU (gloo):

- stage 1 under `torchrun --nproc_per_node 2` and under `accelerate launch --multi_gpu --num_processes 2`: the ranks
  train on different rows and end with identical weights (gradients are synchronized), only the safety modules changed;
- examples/train_stage1.py and examples/train_stage2.py under `accelerate launch` with the paper's DeepSpeed ZeRO-2
  config (configuration/deepspeed_zero2.json): the optimizer state is partitioned across the ranks.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_safe_llava import SafeLlavaForConditionalGeneration
from modeling_safe_llava.modeling_safe_llava import SAFETY_PARAMETER_PREFIXES
from modeling_safe_llava.tiny import build_tiny_safe_llava
from modeling_safe_llava.training.stages import language_model_prefix


REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # --multi_gpu picks accelerate's torch.distributed launcher; with no GPU the ranks run on CPU with gloo
    # (`--cpu` would pick its single-process launcher instead).
    "accelerate": [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
    ],
}  # fmt: skip

WORKER = textwrap.dedent(
    """
    import json, os, sys

    import torch.distributed as dist
    from safetensors.torch import save_file

    from modeling_safe_llava.tiny import build_tiny_safe_llava
    from modeling_safe_llava.training import SafeLlavaTrainingCollator, synthetic_safety_records, train_stage1

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    seen_rows = []  # which rows this rank trained on (the collator ignores the extra column)
    original_call = SafeLlavaTrainingCollator.__call__

    def recording_call(self, rows):
        seen_rows.extend(row["row_id"] for row in rows)
        return original_call(self, rows)

    SafeLlavaTrainingCollator.__call__ = recording_call
    model, processor = build_tiny_safe_llava(seed=0)
    records = [dict(record, row_id=index) for index, record in enumerate(synthetic_safety_records(64, seed=0))]
    model = train_stage1(model, processor, records, os.path.join(out, "run"), max_steps=3, disable_tqdm=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}.safetensors"))
    info = {
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "trained": model.config.safety_modules_trained,
        "rows": seen_rows,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    """
)


def launch_two_processes(launcher: str, script_and_args: list[str], timeout: int = 180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = LAUNCHERS[launcher] + [str(argument) for argument in script_and_args]
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_stage1_with_two_cpu_processes_ends_with_identical_weights(tmp_path, launcher):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    launch_two_processes(launcher, [worker, tmp_path])

    rows = []
    for rank in (0, 1):
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (info["world_size"], info["backend"], info["trained"]) == (2, "gloo", True)
        assert len(info["rows"]) >= 3 * 8  # 3 steps of per-device batch 8 (the loader may fetch one batch ahead)
        rows.append(set(info["rows"]))
    assert not rows[0] & rows[1]  # each rank saw its own rows (one epoch holds 4 batches per rank), so equal
    # weights below mean the gradients were synchronized
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    saved = SafeLlavaForConditionalGeneration.from_pretrained(tmp_path / "run").state_dict()  # written by rank 0
    initial = build_tiny_safe_llava(seed=0)[0].state_dict()
    assert rank0.keys() == rank1.keys() == initial.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(saved[name], rank0[name]), name
        assert torch.equal(rank0[name], initial[name]) != name.startswith(SAFETY_PARAMETER_PREFIXES), name


@pytest.mark.slow
@pytest.mark.multiprocess
def test_training_scripts_under_accelerate_launch_with_deepspeed_zero2_partition_the_optimizer(tmp_path):
    stage1_dir, stage2_dir = tmp_path / "stage1", tmp_path / "stage2"
    common = ["--deepspeed", REPO / "configuration" / "deepspeed_zero2.json", "--max_steps", "2", "--disable_tqdm", "true"]
    stage1 = [REPO / "examples" / "train_stage1.py", "--output_dir", stage1_dir, "--save_strategy", "steps"]
    launch_two_processes("accelerate", stage1 + ["--save_steps", "2", *common])

    # ZeRO-2: each rank holds its own slice of the fp32 master weights and Adam moments of the trainable parameters.
    initial = build_tiny_safe_llava(seed=0)[0].state_dict()  # the scripts' tiny model (--seed_for_tiny_model 0)
    safety_numel = sum(value.numel() for name, value in initial.items() if name.startswith(SAFETY_PARAMETER_PREFIXES))
    step_dir = stage1_dir / "checkpoint-2" / "global_step2"
    partitions = [
        torch.load(step_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        for rank in (0, 1)
    ]
    partitions = [saved["optimizer_state_dict"] for saved in partitions]
    sizes = [sum(slice_.numel() for slice_ in p["single_partition_of_fp32_groups"]) for p in partitions]
    assert [int(p["zero_stage"]) for p in partitions] == [2, 2]
    assert all(set(p["partition_count"]) == {2} for p in partitions)
    assert sum(sizes) == safety_numel and max(sizes) < safety_numel  # saved without the alignment padding

    trained = SafeLlavaForConditionalGeneration.from_pretrained(stage1_dir)
    assert trained.config.safety_modules_trained
    for name, value in trained.state_dict().items():
        assert torch.equal(value, initial[name]) != name.startswith(SAFETY_PARAMETER_PREFIXES), name

    stage2 = [REPO / "examples" / "train_stage2.py", "--model_name_or_path", stage1_dir, "--output_dir", stage2_dir]
    launch_two_processes("accelerate", stage2 + common)
    adapter = load_file(str(stage2_dir / "adapter_model.safetensors"))
    language_model = language_model_prefix(trained)
    assert adapter and all(f".{language_model}." in name and ".lora_" in name for name in adapter)
    assert any(value.abs().max() > 0 for name, value in adapter.items() if ".lora_B." in name)  # B starts at zero
