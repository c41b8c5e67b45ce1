"""Training recipes: one `get_config()` file each (the paper's ImageNet and CIFAR recipes, fine-tuning, the
digits demo), named by module: `imagenet_resnext50` is resnext_jax/configs/imagenet_resnext50.py.

They live in the package so that an installed resnext_jax has them (`python -m resnext_jax.benchmark --config
imagenet_resnext50`); the checkout's top-level configs/ is a link to this directory, so that main.py takes
them as files (`--config=configs/imagenet_resnext50.py`, ml_collections' config_flags).
"""
