"""The watermark detector: timm's efficientnet_b3a + LAION's head, our batched path equal to the reference's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from curation.safety.watermark import WatermarkModel, build_watermark_net, load_watermark, watermark_pixels


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(640, 480), (300, 900), (256, 256), (1000, 700)]
    out = []
    for w, h in sizes:
        base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth-ish content
        out.append(Image.fromarray(base).resize((w, h), Image.BICUBIC))
    return out


@pytest.mark.slow  # an EfficientNet-B3 on CPU, built and run twice
def test_the_batched_path_equals_the_reference_transform_and_model(tmp_path):
    import torchvision.transforms as T

    torch.manual_seed(0)
    net = build_watermark_net().eval()
    # LAION-5B-WatermarkDetection example_use.py: Resize((256, 256)), ToTensor, ImageNet Normalize, softmax[:, 0]
    ref_t = T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    imgs = _images()
    with torch.no_grad():
        want = torch.softmax(net(torch.stack([ref_t(im) for im in imgs])), dim=1)[:, 0].numpy()
    got = WatermarkModel(net, torch.device("cpu")).score(np.stack([watermark_pixels(im) for im in imgs]))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # random weights score every image ~0.5, so compare the inputs the network sees too: equal, and not alike
    ours = torch.from_numpy(np.stack([watermark_pixels(im) for im in imgs])).permute(0, 3, 1, 2).float() / 255
    ours = (ours - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    theirs = torch.stack([ref_t(im) for im in imgs])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (theirs[0] - theirs[1]).abs().mean() > 0.1

    torch.save(net.state_dict(), tmp_path / "watermark_model_v1.pt")
    loaded = load_watermark(str(tmp_path / "watermark_model_v1.pt"))
    np.testing.assert_allclose(loaded.score(np.stack([watermark_pixels(im) for im in imgs])), want, atol=1e-5)


def test_other_weights_are_refused(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not the LAION watermark detector"):
        load_watermark(str(tmp_path / "other.pt"))
