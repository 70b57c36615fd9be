from pathlib import Path

from setuptools import setup

README = Path(__file__).with_name("README.md")

setup(
    name="imagenet-trainer",
    version="0.1.0",
    description="Distributed ImageNet training of ResNets and their plain twins: Lightning, DALI, SLURM, W&B",
    long_description=README.read_text() if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # conf/ is installed as the package trainer.conf, so an installed CLI finds its YAML anywhere.
    packages=["trainer", "data_pipelines", "trainer.conf"],
    package_dir={"trainer.conf": "conf"},
    package_data={"trainer.conf": ["*.yaml", "experiment/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "pytorch-lightning>=2.4,<3",
        "torchmetrics>=1.4",
        "omegaconf>=2.3",
        "numpy>=1.24",
        "pillow>=10",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=2.0"],
        "wandb": ["wandb>=0.19"],
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["imagenet-trainer=trainer.cli:main"]},
)
