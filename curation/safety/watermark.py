"""LAION's watermark detector: timm ``efficientnet_b3a`` with its 1536 -> 625 -> 256 -> 2 head.

Reference: LAION-AI/LAION-5B-WatermarkDetection (commit d8786e32b8a46bd1c254826dae51f54ab5b1e9e4,
MIT licence), ``example_use.py`` and ``models/watermark_model_v1.pt``: the image resized to
256 x 256 (no crop; bilinear, torchvision's ``Resize`` on a PIL image), ImageNet mean/std,
softmax over two classes, class 0 = watermark. LAION-5B's ``pwatermark`` column is this
model's output. The network is timm's (no EfficientNet written here); only the head is
replaced, as the reference does.

In the filter the CPU decode tasks resize each decoded image to 256 x 256 uint8 with PIL
(:func:`watermark_pixels`) and the model actor normalises and runs the batch
(:meth:`WatermarkModel.score`); ``tests/curation/test_safety_watermark.py`` checks that
this equals the reference's torchvision transform + model on random weights.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

SIZE = 256
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
URL = "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt"


def build_watermark_net() -> nn.Module:
    """timm's efficientnet_b3a (random weights) with the detector's head."""
    from paradiffusion.deps import require

    timm = require("timm", "timm", extra="curation")
    net = timm.create_model("efficientnet_b3a", pretrained=False, num_classes=2)
    net.classifier = nn.Sequential(
        nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(p=0.3), nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2)
    )
    return net


def watermark_pixels(img: Image.Image) -> np.ndarray:
    """The detector's input geometry as uint8 HWC: the whole image squashed to 256 x 256 (bilinear
    with antialiasing: PIL's resize, which torchvision's ``Resize`` calls for a PIL image)."""
    return np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8)


class WatermarkModel:
    """The loaded detector on a device; :meth:`score` gives P(watermark) per image."""

    def __init__(self, net: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32):
        self.net, self.device, self.dtype = net.to(device, dtype).eval(), device, dtype

    @torch.inference_mode()
    def score(self, pixels: np.ndarray) -> np.ndarray:
        """P(watermark) of uint8 pixels ``(N, 256, 256, 3)`` from :func:`watermark_pixels`."""
        x = torch.as_tensor(pixels).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        logits = self.net(((x - mean) / std).to(self.dtype)).float()
        return torch.softmax(logits, dim=1)[:, 0].cpu().numpy()


def load_watermark(path_or_url: str, device: str = "cpu", precision: str = "fp32") -> WatermarkModel:
    """Load ``watermark_model_v1.pt`` (a state dict, read weights-only) into timm's network."""
    from curation.models import _DTYPES, _load_state_dict, resolve_device

    state = _load_state_dict(path_or_url)
    if "classifier.0.weight" not in state:
        raise ValueError(
            f"{path_or_url}: not the LAION watermark detector's state dict (no 'classifier.0.weight'; "
            f"keys: {sorted(state)[:6]})"
        )
    net = build_watermark_net()
    net.load_state_dict(state)
    dev = resolve_device(device)
    return WatermarkModel(net, dev, _DTYPES[precision] if dev.type != "cpu" else torch.float32)
