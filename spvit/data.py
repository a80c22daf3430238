"""Image folders in ImageNet layout, class subsets, timm transforms and resumable sampling.

``<data_dir>/train/<class>/*`` and ``<data_dir>/val/<class>/*``; train and val share one
class-to-index mapping. Every tool that reads images goes through here.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import ImageDataset, Mixup, create_transform, resolve_data_config
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from .errors import SpvitError


def _posterize_zero_bits(img, bits_to_keep, **kwargs):
    """timm's RandAugment ('inc1' at full magnitude) asks for 0 bits, which Pillow >= 13 rejects;
    older Pillow returned a black image, which is what this keeps."""
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return _timm_posterize(img, bits_to_keep, **kwargs)


def _patch_posterize() -> None:
    from timm.data import auto_augment
    global _timm_posterize
    if getattr(auto_augment.NAME_TO_OP['PosterizeIncreasing'], '__name__', '') == '_posterize_zero_bits':
        return
    _timm_posterize = auto_augment.posterize
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        auto_augment.NAME_TO_OP[name] = _posterize_zero_bits


_timm_posterize = None
_patch_posterize()


class DataError(SpvitError):
    """The image folder is missing, empty or inconsistent."""


def _class_dirs(root: str) -> List[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))


def select_classes(data_dir: str, subset_classes: Optional[int] = None, class_list: Optional[str] = None,
                   splits: Sequence[str] = ('train', 'val')) -> List[str]:
    """The classes to use, in index order: all, the first N in sorted order, or those listed in a file.
    Evaluation passes ``splits=('val',)``: the sorted val classes are the sorted train classes."""
    if not os.path.isdir(data_dir):
        raise DataError(f'data dir not found: {data_dir}')
    found = {}
    for split in splits:
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            raise DataError(f'{data_dir} has no {split}/ folder (expected {split}/<class>/<images>)')
        found[split] = _class_dirs(root)
        if not found[split]:
            raise DataError(f'no class folders in {root}')
    if class_list:
        try:
            with open(class_list) as f:
                classes = [line.strip() for line in f if line.strip() and not line.startswith('#')]
        except OSError as e:
            raise DataError(f'cannot read class list {class_list}: {e.strerror}') from None
        if not classes:
            raise DataError(f'class list {class_list} is empty')
        unknown = [c for c in classes if c not in found[splits[0]]]
        if unknown:
            raise DataError(f'classes in {class_list} not in {splits[0]}/: {", ".join(unknown[:5])}')
        if len(set(classes)) != len(classes):
            raise DataError(f'class list {class_list} repeats classes')
    elif subset_classes:
        first = found[splits[0]]
        if subset_classes > len(first):
            raise DataError(f'--subset-classes {subset_classes} but {splits[0]}/ has {len(first)} classes')
        classes = first[:subset_classes]
    elif len(splits) == 1:
        classes = found[splits[0]]
    else:
        if found['train'] != found['val']:
            only_train = sorted(set(found['train']) - set(found['val']))
            only_val = sorted(set(found['val']) - set(found['train']))
            raise DataError(f'train/ and val/ classes differ (only in train: {only_train[:3]}, only in val: {only_val[:3]})')
        classes = found['train']
    missing = [c for c in classes if c not in found[splits[-1]]]
    if missing:
        raise DataError(f'classes missing from val/: {", ".join(missing[:5])}')
    return classes


def image_folder(root: str, classes: Sequence[str], samples_per_class: Optional[int] = None,
                 transform: Any = None) -> ImageDataset:
    """timm ImageDataset over ``classes`` (index = position), capped at the first N images of
    each class in sorted order."""
    class_map = {c: i for i, c in enumerate(classes)}
    try:
        ds = ImageDataset(root, class_map=class_map, transform=transform)
    except RuntimeError as e:
        raise DataError(str(e).splitlines()[0]) from None
    ds.reader.samples = unique_files(ds.reader.samples)
    if samples_per_class:
        counts: Dict[int, int] = {}
        kept = []
        for path, target in ds.reader.samples:
            if counts.get(target, 0) < samples_per_class:
                counts[target] = counts.get(target, 0) + 1
                kept.append((path, target))
        ds.reader.samples = kept
    present = {t for _, t in ds.reader.samples}
    if len(present) != len(classes):
        empty = [c for i, c in enumerate(classes) if i not in present]
        raise DataError(f'no images for classes {", ".join(empty[:5])} in {root}')
    return ds


def unique_files(samples: Sequence[Tuple[str, int]]) -> List[Tuple[str, int]]:
    """Each image once: timm's folder walk follows symlinks, and a link to a folder above it (a
    loop) makes it list the same files again and again, down to the OS's link limit. Folders are
    resolved once each, so this costs one realpath per folder, not per file."""
    real: Dict[str, str] = {}
    seen, kept = set(), []
    for path, target in samples:
        folder, name = os.path.split(path)
        key = (real.setdefault(folder, os.path.realpath(folder)), name)
        if key not in seen:
            seen.add(key)
            kept.append((path, target))
    return kept


def data_config(model: torch.nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                interpolation: Optional[str] = None, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """Input size, crop, interpolation and normalisation: the model's pretrained config unless given.
    The input size defaults to what the model was built for (its patch embedding's img_size),
    which differs from the pretrained config when timm was given another img_size."""
    built_for = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    input_size = None
    if img_size is None and built_for is not None:
        input_size = (3, *built_for)
    args = {k: v for k, v in dict(img_size=img_size, input_size=input_size, crop_pct=crop_pct, interpolation=interpolation,
                                  mean=tuple(mean) if mean else None, std=tuple(std) if std else None).items()
            if v is not None}
    cfg = resolve_data_config(args, model=model)
    return {'input_size': list(cfg['input_size']), 'interpolation': cfg['interpolation'],
            'mean': list(cfg['mean']), 'std': list(cfg['std']), 'crop_pct': cfg['crop_pct']}


def train_transform(cfg: Dict[str, Any], auto_augment: Optional[str], color_jitter: float, reprob: float,
                    hflip: float = 0.5, scale: Sequence[float] = (0.08, 1.0)):
    """DeiT's training recipe through timm: RandomResizedCrop, flip, RandAugment, random erasing."""
    if scale[0] > scale[1]:
        raise DataError(f'--scale {scale[0]:g} {scale[1]:g}: the smallest crop area comes first')
    try:
        return create_transform(
            tuple(cfg['input_size']), is_training=True, scale=tuple(scale), auto_augment=auto_augment or None,
            color_jitter=color_jitter, re_prob=reprob, re_mode='pixel', re_count=1, hflip=hflip,
            interpolation=cfg['interpolation'], mean=tuple(cfg['mean']), std=tuple(cfg['std']))
    except (AssertionError, ValueError, KeyError) as e:      # timm asserts on an unknown policy
        raise DataError(f'--auto-augment {auto_augment!r}: {e}') from None


def eval_transform(cfg: Dict[str, Any]):
    return create_transform(tuple(cfg['input_size']), is_training=False, interpolation=cfg['interpolation'],
                            mean=tuple(cfg['mean']), std=tuple(cfg['std']), crop_pct=cfg['crop_pct'])


def mixup(mixup_alpha: float, cutmix_alpha: float, smoothing: float, num_classes: int) -> Optional[Mixup]:
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=smoothing,
                 num_classes=num_classes)


class ResumableSampler(Sampler):
    """Per-epoch shuffle (seeded by seed and epoch), sharded over ranks, that can start mid-epoch.

    Skipping the first ``start`` samples instead of loading them is what makes a resumed run draw
    the same augmentation randomness as an uninterrupted one.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.base = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                                       seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.base)[self.start:])

    def __len__(self) -> int:
        return len(self.base) - self.start


def readable(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches; when images cannot be read, one line instead of a data worker's
    traceback. timm skips a few unreadable files (a warning each, naming it) before it gives up; an
    image over PIL's decompression-bomb limit is no OSError, so timm does not skip it."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (RuntimeError, OSError, Image.DecompressionBombError) as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            hint = ' (the warnings above name the files)' if 'consecutive samples' in str(e) else ''
            error = f'cannot read the images: {lines[-1] if lines else repr(e)}{hint}'
            e.__traceback__ = None  # its frames hold the iterator in a reference cycle
        else:
            yield batch
            continue
        # Dropping the iterator stops its workers now: the warnings they still print come before the error.
        del batches
        raise DataError(error)


def train_loader(dataset, batch_size: int, workers: int, sampler: ResumableSampler, seed: int) -> DataLoader:
    # A private generator keeps the loader's seed draw off the global RNG (exact resume).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
                      persistent_workers=False)


def eval_loader(dataset, batch_size: int, workers: int, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """Each rank evaluates every num_replicas-th image; counts are summed across ranks."""
    shard = Subset(dataset, range(rank, len(dataset), num_replicas)) if num_replicas > 1 else dataset
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                      generator=torch.Generator().manual_seed(0))
