"""Class accuracy of class-conditional samples: a classifier of images in [-1, 1], either a TorchScript file or a
small CNN trained once on the training split, its weights cached per dataset (like the real-data Fréchet features)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.io import atomic_path


class SmallCNN(nn.Module):
    """Two conv/pool stages and two linear layers; ``features`` is the 128-d penultimate layer (a Fréchet-distance
    space for small images, as in the digits experiment of the BFM spec)."""

    def __init__(self, channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4),
                                  nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_small_cnn(dataset, channels: int, num_classes: int, epochs: int = 1, seed: int = 0, device="cpu",
                    batch_size: int = 128) -> SmallCNN:
    """``epochs`` of Adam (lr 1e-3) on the ``(image, label)`` items of ``dataset``, shuffled by ``seed``."""
    torch.manual_seed(seed)
    net = SmallCNN(channels, num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    net.train()
    for _ in range(epochs):
        for batch in loader:
            loss = F.cross_entropy(net(batch[0].to(device)), batch[1].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def load_classifier(source: str, dataset, channels: int, num_classes: int, cache_dir: str, key: dict,
                    epochs: int = 1, device="cpu") -> nn.Module:
    """``source`` = "train": the small CNN trained on ``dataset`` once per ``key`` (the dataset and settings), its
    weights cached under ``cache_dir``; otherwise the path of a TorchScript classifier (images in [-1, 1] -> logits)."""
    if source != "train":
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"classifier file not found: {path} (eval.classifier: a TorchScript file, \"train\" or null)")
        try:
            return torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as e:
            raise UserError(f"cannot load the classifier {path} as TorchScript (torch.jit.save): {e}") from e
    full = {**key, "channels": channels, "num_classes": num_classes, "epochs": epochs}
    digest = hashlib.sha1(repr(sorted(full.items())).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"classifier_{digest}.pt"
    net = SmallCNN(channels, num_classes)
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        net = train_small_cnn(dataset, channels, num_classes, epochs).cpu()
        with atomic_path(path) as tmp:
            torch.save(net.state_dict(), tmp)
    return net.to(device).eval().requires_grad_(False)


@torch.no_grad()
def class_accuracy(net, images: torch.Tensor, labels: torch.Tensor, device="cpu", batch: int = 500) -> float:
    """Fraction of ``images`` the classifier (on ``device``) assigns to ``labels``."""
    pred = torch.cat([net(x.to(device)).argmax(1).cpu() for x in images.split(batch)])
    return float((pred == labels.cpu()).float().mean())
