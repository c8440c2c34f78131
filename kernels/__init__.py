"""Shared kernel ops: a PyTorch reference and a Triton kernel per op, chosen by one dispatch."""

from blocktrain.kernels.block_sparse_linear import block_sparse_linear
from blocktrain.kernels.dispatch import get_backend, set_backend, use_backend
from blocktrain.kernels.fake_quant import fake_quant
from blocktrain.kernels.lora_linear import lora_linear
from blocktrain.kernels.poincare import block_mobius_matvec
from blocktrain.kernels.quant_matmul import quant_matmul

__all__ = ["block_mobius_matvec", "block_sparse_linear", "fake_quant", "get_backend", "lora_linear", "quant_matmul",
           "set_backend", "use_backend"]
