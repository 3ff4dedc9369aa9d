"""Stage 1 under `torchrun --nproc_per_node 2` on CPU (gloo): the ranks train on different rows and end with identical
weights (gradients are synchronized), only the safety modules changed."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from modeling_safe_llava import SafeLlavaForConditionalGeneration
from modeling_safe_llava.modeling_safe_llava import SAFETY_PARAMETER_PREFIXES
from modeling_safe_llava.tiny import build_tiny_safe_llava

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


@pytest.mark.slow
def test_stage1_under_torchrun_with_two_cpu_processes_ends_with_identical_weights(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(worker), str(tmp_path)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

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
