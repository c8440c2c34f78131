"""The generative-model library (used by the ``flow_matching`` and ``bfm`` plugins), one place each:

- ``config``: the ``idx_images`` data kind, the ``sit`` model kind, sizes, encoder/sampler/eval settings (torch-free);
- ``data``: idx files (Fashion-MNIST) as datasets; ``layers``: DiT blocks (adaLN-Zero, patchify, embedders);
- ``models``: SiT, the single-network velocity transformer; ``flow``: the linear path, the loss and the samplers;
- ``encoders``: frozen EfficientNet-Lite0 / DINOv2 features; ``metrics``: Fréchet distance and KID (torchmetrics);
- ``evaluation``: generating images (NFE, FLOPs per sample, VAE latents) and scoring them.
"""
