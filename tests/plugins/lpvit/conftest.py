"""The compression tests' tiny ViT and image folder, and one intra-op thread for toy models."""
from tests.compression.conftest import images, one_thread, vit_checkpoint  # noqa: F401  (fixtures)
