"""Resuming: a run interrupted after a checkpoint and resumed with the stock Trainer's `resume_from_checkpoint` ends
with the same weights as an uninterrupted run, in-process and after a real SIGKILL of the training script."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from modeling_safe_llava import SafeLlavaForConditionalGeneration
from modeling_safe_llava.tiny import build_tiny_safe_llava
from modeling_safe_llava.training import (
    last_complete_checkpoint,
    resolve_resume_checkpoint,
    synthetic_safety_records,
    train_stage1,
    train_stage2,
)

REPO = Path(__file__).resolve().parents[1]
QUIET = {"disable_tqdm": True, "logging_steps": 1000}
# 32 rows, batch 8: 4 steps per epoch, so a checkpoint at step 3 sits in the middle of the first epoch.
SCHEDULE = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3, **QUIET}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: two pytest workers share two cores (see tests/test_training_stages.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class SimulatedCrash(RuntimeError):
    pass


class CrashAfterSave(TrainerCallback):
    """Raises right after the checkpoint of `step` is written, as a crash or a pre-emption would stop a run."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SimulatedCrash(f"simulated crash after the checkpoint of step {self.step}")


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def weights(model) -> dict[str, torch.Tensor]:
    """State dict with names as in SafeLlava (a PeftModel's `base_model.model.` prefix removed)."""
    return {name.removeprefix("base_model.model."): t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def stage1_folder(tmp_path_factory):
    model, processor = build_tiny_safe_llava(seed=0)
    folder = tmp_path_factory.mktemp("stage1")
    train_stage1(model, processor, synthetic_safety_records(8, seed=3), folder, max_steps=1, **QUIET)
    return folder


@pytest.mark.parametrize("stage", [1, 2])
def test_interrupted_run_resumed_from_its_checkpoint_matches_an_uninterrupted_run(stage, stage1_folder, tmp_path):
    records = synthetic_safety_records(32, seed=0)
    train = train_stage1 if stage == 1 else train_stage2

    def fresh_model(seed=0):
        model, processor = build_tiny_safe_llava(seed=seed)
        if stage == 2:
            model = SafeLlavaForConditionalGeneration.from_pretrained(stage1_folder)
        return model, processor

    model, processor = fresh_model()
    uninterrupted = weights(train(model, processor, records, tmp_path / "uninterrupted", **SCHEDULE))

    model, processor = fresh_model()
    with pytest.raises(SimulatedCrash):
        train(model, processor, records, tmp_path / "interrupted", callbacks=[CrashAfterSave(3)], **SCHEDULE)
    assert last_complete_checkpoint(tmp_path / "interrupted").name == "checkpoint-3"
    crashed_at_step_3 = weights(model)

    # A new process starts from scratch too; in stage 1 even from another initialisation, which the checkpoint
    # must overwrite.
    model, processor = fresh_model(seed=1)
    counter = StepCounter()
    resume = {"resume_from_checkpoint": "latest", "callbacks": [counter]}
    resumed = weights(train(model, processor, records, tmp_path / "interrupted", **resume, **SCHEDULE))

    assert counter.steps == 3  # steps 4-6 only: the run continued from the checkpoint
    assert resumed.keys() == uninterrupted.keys()
    trained = [name for name in resumed if not torch.equal(crashed_at_step_3[name], resumed[name])]
    assert trained, "the resumed run did not train"
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_latest_checkpoint_skips_partial_folders(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume_checkpoint("latest", tmp_path)
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-final").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-2")
    assert resolve_resume_checkpoint(None, tmp_path) is None
    with pytest.raises(ValueError, match="is not a folder"):
        resolve_resume_checkpoint(str(tmp_path / "nowhere"), tmp_path)


def run_script(output_dir: Path, *extra: str) -> subprocess.Popen:
    """examples/train_stage1.py (tiny model, built-in synthetic data) checkpointing every 4 of 40 steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, str(REPO / "examples" / "train_stage1.py"), "--output_dir", str(output_dir),
        "--max_steps", "40", "--save_strategy", "steps", "--save_steps", "4", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip
    log = open(output_dir.parent / f"{output_dir.name}{'_'.join(extra)}.log", "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def _parses(json_file) -> bool:
    """The Trainer writes trainer_state.json last: the checkpoint is complete once it parses (it may exist half-written)."""
    try:
        json.loads(json_file.read_text())
    except (OSError, ValueError):
        return False
    return True


def test_training_script_killed_after_its_first_checkpoint_resumes_to_the_same_weights(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = run_script(reference_dir)
    killed = run_script(killed_dir)
    first_checkpoint = killed_dir / "checkpoint-4" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not _parses(first_checkpoint) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    assert first_checkpoint.exists() and not (killed_dir / "model.safetensors").exists()

    first_checkpoint_written = first_checkpoint.stat().st_mtime_ns
    # Another initialisation for the resumed process: only weights restored from the checkpoint can match.
    resumed = run_script(killed_dir, "--resume_from_checkpoint", "latest", "--seed_for_tiny_model", "1")
    resumed_log = tmp_path / "killed--resume_from_checkpoint_latest_--seed_for_tiny_model_1.log"
    assert resumed.wait(timeout=180) == 0, resumed_log.read_text()
    assert reference.wait(timeout=180) == 0, (tmp_path / "reference.log").read_text()

    expected = load_file(str(reference_dir / "model.safetensors"))
    actual = load_file(str(killed_dir / "model.safetensors"))
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    assert first_checkpoint.stat().st_mtime_ns == first_checkpoint_written  # steps 1-4 were not trained again
    first = load_file(str(killed_dir / "checkpoint-4" / "model.safetensors"))
    head = "model.safety_head.level_classifier.weight"  # the name on disk (see the conversion mapping)
    assert not torch.equal(first[head], actual[head])  # training went on after the first checkpoint
