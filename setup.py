"""beit_fast: the fastest correct BEiT pretraining for PyTorch.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are installed as
``beit_fast.kernels`` (PyPI has an unrelated package called ``kernels``; never import it bare).
"""
from setuptools import find_packages, setup

setup(
    name="beit_fast",
    version="0.1.0",
    description="Fast, faithful BEiT (masked image modeling with visual tokens) pretraining for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # every package under beit_fast/ (a hand-kept list once left new subpackages out of the wheel), plus kernels/
    packages=find_packages(include=["beit_fast", "beit_fast.*"]) + ["beit_fast.kernels"],
    package_dir={"beit_fast": "beit_fast", "beit_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.10,<=2.14.1",
        "torchvision",
        "triton; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "tqdm",
        "scikit-image",
        "scikit-learn",  # the labelled digits data set (fine-tuning default, evidence script)
        "matplotlib",  # beit_fast.visualize
    ],
    extras_require={
        # Tests exercise the HuggingFace/timm interop, the property-based input checks and the TensorBoard
        # scalars of --log_dir. simplejpeg: the decoder comparison of benchmarks/bench_input_pipeline.py and
        # the decoder-tolerance test. torchao: the FP8 conversion and emulated-parity tests (torchao 0.18.0
        # with torch 2.14.1 on CPU: tests/test_fp8.py passes, nothing skipped).
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "transformers", "timm", "safetensors", "simplejpeg",
                "tensorboard", "torchao>=0.13"],
        "tensorboard": ["tensorboard"],  # pretrain --log_dir
        "jpeg": ["simplejpeg"],  # --jpeg_decoder auto / simplejpeg: Pillow's pixels, faster decode
        "hf": ["transformers>=5", "safetensors"],
        "timm": ["timm", "safetensors"],
        "xformers": ["xformers"],
        # --fp8: torchao's float8 training (pick the torchao release built for your torch: 0.18 for torch 2.11)
        "fp8": ["torchao>=0.13"],
    },
)
