"""Small synthetic image folders, learnable by class, for tests and smoke runs."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image


def make_image_folder(root: str, num_classes: int = 4, train_per_class: int = 16, val_per_class: int = 4,
                      size: int = 32, seed: int = 0, splits: Sequence[str] = ('train', 'val')) -> str:
    """Write ``root/{train,val}/class_XX/*.png``: each class a fixed colour pattern plus noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(num_classes, 4, 4, 3)).astype(np.float32)
    for split, count in zip(splits, (train_per_class, val_per_class)):
        for c in range(num_classes):
            folder = os.path.join(root, split, f'class_{c:02d}')
            os.makedirs(folder, exist_ok=True)
            base = np.kron(patterns[c], np.ones((size // 4, size // 4, 1), dtype=np.float32))
            for i in range(count):
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(folder, f'{i:04d}.png'))
    return root
