"""The LAM ViT: identity init equals vanilla, backends agree, mask images, and it learns real Fashion-MNIST."""
from __future__ import annotations

import io
import tarfile
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lamscale.config import LAMConfig, ModelConfig
from lamscale.model.vit import ViT


def _cfg(layers="all", backend="chunked", dim=32, depth=2, **lam) -> ModelConfig:
    return ModelConfig(dim=dim, layers=depth, heads=4, ffn_mult=2, dropout=0.0, checkpointing=False,
                       lam=LAMConfig(layers=layers, backend=backend, rank=4, hidden=16, max_len=17, **lam))


def test_lam_at_init_equals_vanilla_exactly():
    torch.manual_seed(0)
    vanilla = ViT(_cfg(layers="none"), 28, 7, 1, 10).eval()
    lam = ViT(_cfg(layers="all"), 28, 7, 1, 10).eval()
    missing, unexpected = lam.load_state_dict(vanilla.state_dict(), strict=False)
    assert not unexpected and all(".mask_gen." in k for k in missing)
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(lam(images), vanilla(images))


@pytest.mark.parametrize("combine", ["mul", "add"])
def test_backends_agree_in_float64(combine):
    torch.manual_seed(1)
    dense = ViT(_cfg(backend="dense", combine=combine), 28, 7, 1, 10).double()
    for p in dense.parameters():
        p.data.normal_(0, 0.3)
    other = ViT(_cfg(backend="chunked", combine=combine), 28, 7, 1, 10).double()
    other.load_state_dict(dense.state_dict())
    images = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(other(images), dense(images), rtol=1e-10, atol=1e-12)


def test_wrong_image_shape_is_one_line():
    with pytest.raises(ValueError, match=r"images are 3×28×28, the model takes 1×28×28"):
        ViT(_cfg(), 28, 7, 1, 10)(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        ViT(_cfg(), 28, 5, 1, 10)


def test_mask_images_cover_cls_and_patches():
    model = ViT(_cfg(layers=[1]), 28, 7, 1, 10).eval()
    with torch.no_grad(), model.capture_masks(sample=1) as maps:
        model(torch.randn(2, 1, 28, 28))
    assert [(layer, tuple(m.shape)) for layer, m in maps] == [(1, (1, 17, 17))]
    assert torch.equal(maps[0][1], torch.ones(1, 17, 17))  # mul identity init: M ≡ 1


def _fashion_mnist(repo_root, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in sorted((repo_root / "shards" / "fashion_mnist_sample").glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".png")):
                key = name[: -len(".png")]
                images.append(np.array(Image.open(io.BytesIO(tar.extractfile(members[name]).read()))))
                labels.append(json.loads(tar.extractfile(members[key + ".json"]).read())["label"])
    x = torch.from_numpy(np.stack(images)).float().div(255).unsqueeze(1)
    return (x - 0.286) / 0.353, torch.tensor(labels)


def test_learns_real_fashion_mnist_far_beyond_chance(repo_root):
    """400 steps on the embedded real subset (6,000 train images) in plain PyTorch: ≥ 65 % top-1 on its
    1,000 test images (chance 10 %); a small multi-layer-LAM ViT, patch 7."""
    torch.manual_seed(0)
    train_x, train_y = _fashion_mnist(repo_root, "train")
    test_x, test_y = _fashion_mnist(repo_root, "test")
    assert len(train_y) == 6000 and len(test_y) == 1000
    model = ViT(_cfg(dim=48), 28, 7, 1, 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, len(train_y), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(train_x[idx]), train_y[idx], label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy >= 0.65, accuracy
