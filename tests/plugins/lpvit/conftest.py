"""The compression tests' tiny ViT and image folder (one intra-op thread: ``ONE_THREAD`` in tests/conftest.py)."""
from tests.compression.conftest import images, vit_checkpoint  # noqa: F401  (fixtures)
