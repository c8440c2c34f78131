"""Quantization tests run on one intra-op thread (``ONE_THREAD`` in tests/conftest.py); ``llm_args`` runs an LLM
recipe on the tiny Llama and corpus of tests/conftest.py (hidden 32, MLP 64: groups of 16 divide every width)."""
from tests.helpers import llm_args  # noqa: F401  (imported by the tests from here)
