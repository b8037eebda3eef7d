import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """Copy the top-level ``kernels/`` modules into the built ``lime_fast.kernels`` package. The folder is
    no package of its own (see lime_fast/kernels/__init__.py); an editable install reads it in place."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            for source in sorted(Path("kernels").glob("*.py")):
                self.copy_file(str(source), str(Path(self.build_lib) / "lime_fast" / "kernels" / source.name))

VERSION = re.search(r'^__version__ = "([^"]+)"', Path("lime_fast/__init__.py").read_text(), re.M)[1]  # the one home

setup(
    name="lime-fast",
    version=VERSION,
    description="Fast, dependable LIME: training-free localized image editing for InstructPix2Pix-family models",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lime_fast", "lime_fast.kernels", "lime_fast.batch", "lime_fast.testing", "lime_fast.evaluate",
              "lime_fast.serve"],
    cmdclass={"build_py": BuildPy},
    package_data={"lime_fast": ["data/*.txt", "data/*.json", "data/configs/*/*.json", "data/configs/*/*/*.json",
                                "data/shapes-ip2p/*.json", "data/shapes-ip2p/*.md", "data/shapes-ip2p/*.png",
                                "data/shapes-ip2p/*/*.json", "data/shapes-ip2p/*/*.safetensors"],
                  "lime_fast.serve": ["static/*"]},
    # Ranges for library users (scripts/install.sh installs the exact versions of requirements/lock.txt
    # instead). Upper bounds: the next major of each, never tested. torch's CPU or CUDA build is the
    # user's choice: install it first (scripts/install.sh takes the CPU build).
    install_requires=[
        "torch>=2.4,<3",
        "diffusers>=0.30,<1",
        "accelerate>=0.30,<2",
        "transformers>=4.44,<6",
        "safetensors>=0.4,<1",
        "numpy>=1.24,<3",
        "pillow>=9,<14",
        "tqdm>=4.60,<5",
        "packaging>=21",
    ],
    extras_require={
        "dev": ["pytest>=8,<10", "pytest-benchmark>=4,<6", "scikit-learn>=1.3,<2", "triton>=3,<4", "httpx>=0.27,<1",
                "selenium>=4.11,<5", "pip-tools>=7,<8"],
        "triton": ["triton>=3,<4"],
        "cuml": ["cuml-cu12"],
        "ray": ["ray[data]>=2.50,<3"],
        "eval": ["pyarrow>=14,<27"],  # lime-fast eval: MagicBrush's Hugging Face parquet files
        # precision="fp8" (Ada/Hopper GPUs only; not installed by scripts/install.sh: it refuses on a CPU)
        "fp8": ["torchao>=0.14,<1"],
        # lime-fast serve; starlette 0.44 added Request.form(max_part_size=...), multipart 0.0.18 fixed a DoS
        "serve": ["fastapi>=0.115.7,<1", "starlette>=0.44,<2", "uvicorn>=0.30,<1", "python-multipart>=0.0.18,<1"],
    },
    entry_points={"console_scripts": ["lime-fast=lime_fast.cli:main"]},
)
