"""The compression path shared by post-training plugins (pruning, quantization): calibration data,
a resumable calibrate loop, evaluation and the per-layer sparsity report.

``config`` is torch-free (plugin configs embed its dataclasses); the other modules import torch.
"""
