"""Fashion-MNIST as an ImageNet-style folder: the real images ``make demo`` runs on.

The files come from Debian's ``dataset-fashion-mnist`` package where it is installed, else from
torchvision's download; torchvision parses them either way.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
CLASS_DIRS = ('t-shirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'ankle_boot')


def load_fashion_mnist(cache: str, train: bool, source: Optional[str] = DEBIAN_DIR):
    """torchvision's FashionMNIST, fed from ``source`` (the Debian package's .gz files) if it
    has them, else downloaded into ``cache``."""
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import extract_archive
    raw = os.path.join(cache, 'FashionMNIST', 'raw')
    if source and os.path.isdir(source):
        os.makedirs(raw, exist_ok=True)
        for name, _ in FashionMNIST.resources:
            target = os.path.join(raw, name[:-3])
            if os.path.exists(os.path.join(source, name)) and not os.path.exists(target):
                shutil.copy(os.path.join(source, name), os.path.join(raw, name))
                extract_archive(os.path.join(raw, name), raw, remove_finished=True)
    try:
        return FashionMNIST(cache, train=train, download=False)
    except RuntimeError:
        return FashionMNIST(cache, train=train, download=True)


def write_image_folder(out: str, cache: str, train_per_class: int, val_per_class: int,
                       source: Optional[str] = DEBIAN_DIR) -> str:
    """Write ``out/{train,val}/<class>/<index>.png``: the first N images of each class of the
    training split and of the test split. Skips the work if ``out`` is complete already."""
    done = os.path.join(out, '.complete')
    stamp = f'{train_per_class} {val_per_class}\n'
    if os.path.exists(done) and open(done).read() == stamp:
        return out
    if os.path.exists(done):
        os.remove(done)
    for split, train, per_class in (('train', True, train_per_class), ('val', False, val_per_class)):
        shutil.rmtree(os.path.join(out, split), ignore_errors=True)     # a smaller size keeps no extra images
        ds = load_fashion_mnist(cache, train, source)
        counts = [0] * len(CLASS_DIRS)
        for c in CLASS_DIRS:
            os.makedirs(os.path.join(out, split, c), exist_ok=True)
        for i, target in enumerate(ds.targets.tolist()):
            if counts[target] >= per_class:
                if min(counts) >= per_class:
                    break
                continue
            ds[i][0].save(os.path.join(out, split, CLASS_DIRS[target], f'{i:05d}.png'))
            counts[target] += 1
    with open(done, 'w') as f:
        f.write(stamp)
    return out
