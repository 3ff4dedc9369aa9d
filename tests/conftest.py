"""Shared fixtures: everything offline, a private HF_HOME, tiny models built from `configuration/tiny.json`."""

import os
import subprocess
import sys
import tempfile
import textwrap

# Set before transformers is imported anywhere: no machine here reaches the Hub, and remote-code modules are cached
# under HF_HOME, which must not be the user's.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="safe-llava-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bases import BASE_NAMES, BASES  # noqa: E402
from modeling_safe_llava.tiny import build_tiny_llava, build_tiny_safe_llava  # noqa: E402

# Two xdist workers share two cores: more threads per worker only oversubscribe them.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end checks (seconds to a minute); CI runs them too")
    config.addinivalue_line(
        "markers", "multiprocess: launches several processes (torchrun, accelerate launch); CI runs them on the pinned transformers"
    )


def run_without_the_package(script: str, *args, work_dir) -> subprocess.CompletedProcess:
    """
    Runs `script` in a fresh `python -S` process in which `modeling_safe_llava` cannot be imported (as on a machine
    that only downloaded a Hub repo): offline, with its own HF_HOME. -S skips site processing, so the editable
    install's .pth hook never runs; site-packages comes back through PYTHONPATH. The script first checks that the
    package is really absent. Fails the test, with the child's stderr, unless it exits with 0.
    """
    import transformers

    site_packages = os.path.dirname(os.path.dirname(transformers.__file__))
    guard = textwrap.dedent(
        """
        try:
            import modeling_safe_llava
            raise SystemExit("the package must not be importable here")
        except ImportError:
            pass
        """
    )
    path = work_dir / "fresh_process.py"
    path.write_text(guard + textwrap.dedent(script))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(work_dir / "hf_home"), PYTHONPATH=site_packages)
    result = subprocess.run(
        [sys.executable, "-S", str(path), *map(str, args)],
        cwd=work_dir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def random_image(seed: int, size: int = 20) -> Image.Image:
    """A deterministic RGB noise image."""
    pixels = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def chat_prompt(processor, question: str = "What is shown in this image?", images: int = 1) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(params=BASE_NAMES)
def base(request):
    """Each base SafeLlava supports (`bases.BASES`) in turn: a test taking `base` runs once per base."""
    return BASES[request.param]


@pytest.fixture
def tiny_llava():
    """A fresh random stock LLaVA and its processor (seed 0)."""
    return build_tiny_llava(seed=0)


@pytest.fixture
def tiny_safe_llava():
    """A fresh tiny SafeLlava (untrained safety modules, paper policy texts tokenized) and its processor."""
    return build_tiny_safe_llava(seed=0)


@pytest.fixture
def trained_tiny_safe_llava(tiny_safe_llava):
    """The tiny SafeLlava marked as trained (its random head stands in for a trained one in mechanics tests)."""
    model, processor = tiny_safe_llava
    model.config.safety_modules_trained = True
    return model, processor
