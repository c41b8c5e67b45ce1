from setuptools import find_packages, setup

setup(
    name="resnext-jax",
    version="0.1.0",
    description="ResNeXt (Aggregated Residual Transformations, CVPR 2017) in JAX/Flax",
    packages=find_packages(include=["resnext_jax", "resnext_jax.*"]),
    # The CPU kernels' sources (compiled on first use) and data tables (ImageNet's class names).
    package_data={"resnext_jax": ["cpu/csrc/*.cc", "cpu/csrc/*.h", "datasets/csrc/*.cc", "data/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7,<0.12",
        "flax>=0.11,<0.14",
        "optax>=0.2.4,<0.4",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-cpu>=2.18,<2.23",
        "tensorboard>=2.18,<2.23",
        "tensorflow-datasets>=4.9.7,<4.11",
        "ml_collections>=1.0,<2",
        "clu>=0.0.12,<0.1",
        "numpy>=1.26,<3",
        "pillow>=10,<14",
        "safetensors>=0.4,<0.9",
        "scikit-learn>=1.4,<2",
        "matplotlib>=3.8,<4",
        "importlib_resources>=6",  # tensorflow-datasets needs it to prepare datasets but does not declare it
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
        # torch, torchvision, timm: .pth files, the benchmark's comparison, and the tests that compare the
        # augmentations with torchvision's and timm's (tests/test_augment.py).
        "torch": ["torch>=2.4,<=2.14.1", "torchvision>=0.19,<=0.29.1", "timm>=1.0,<=1.0.31"],
    },
)
