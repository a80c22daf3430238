"""Options shared by the tools that build models, read images and train (search, fine-tune, eval).

Each tool's config is a dataclass made of these groups plus its own fields; every field is a YAML
key and a flag of the same name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .config import AT_LEAST_ONE, FRACTION, FRACTION_BELOW_ONE, NON_NEGATIVE, POSITIVE, Bounds, field

INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest', 'box', 'hamming', 'lanczos', 'random')


@dataclass
class ModelOptions:
    model: str = field('deit_tiny_patch16_224', 'timm model name')
    model_kwargs: Dict[str, Any] = field({}, 'extra timm.create_model arguments (KEY=VALUE ...)')
    pretrained: bool = field(False, "start from timm's pretrained weights (needs internet)")
    checkpoint: Optional[str] = field(None, 'start from these weights (.pth/.pt/.safetensors)')
    num_classes: Optional[int] = field(None, 'classifier size (default: number of classes in the data)', bounds=AT_LEAST_ONE)


@dataclass
class DataOptions:
    data_dir: Optional[str] = field(None, 'ImageNet-layout folder with train/ and val/')
    subset_classes: Optional[int] = field(None, 'use the first N classes in sorted order', bounds=AT_LEAST_ONE)
    class_list: Optional[str] = field(None, 'file with one class folder name per line')
    samples_per_class: Optional[int] = field(None, 'cap each class at its first N images', bounds=AT_LEAST_ONE)
    img_size: Optional[int] = field(None, 'input size (default: the model\'s)', bounds=AT_LEAST_ONE)
    crop_pct: Optional[float] = field(None, 'eval center-crop fraction', bounds=Bounds(0, 1, low_open=True))
    interpolation: Optional[str] = field(None, 'resize interpolation', choices=INTERPOLATIONS)
    mean: Optional[List[float]] = field(None, 'normalisation mean (3 values)', bounds=Bounds(count=3))
    std: Optional[List[float]] = field(None, 'normalisation std (3 values)', bounds=Bounds(0, low_open=True, count=3))
    scale: List[float] = field([0.08, 1.0], 'RandomResizedCrop area range (2 values)', bounds=Bounds(0, 1, low_open=True, count=2))
    auto_augment: Optional[str] = field('rand-m9-mstd0.5-inc1', 'RandAugment policy ("" to disable)')
    color_jitter: float = field(0.3, 'color jitter strength', bounds=NON_NEGATIVE)
    reprob: float = field(0.25, 'random erasing probability', bounds=FRACTION)
    mixup: float = field(0.8, 'mixup alpha (0 disables)', bounds=NON_NEGATIVE)
    cutmix: float = field(1.0, 'cutmix alpha (0 disables)', bounds=NON_NEGATIVE)
    smoothing: float = field(0.1, 'label smoothing', bounds=FRACTION_BELOW_ONE)


@dataclass
class TrainOptions:
    lr: float = field(5e-5, 'weight learning rate for a global batch of 512 (scaled linearly)', bounds=NON_NEGATIVE)
    weight_decay: float = field(0.05, 'weight decay of the network weights', bounds=NON_NEGATIVE)
    min_lr: float = field(1e-6, 'cosine schedule floor', bounds=NON_NEGATIVE)
    warmup_epochs: int = field(0, 'linear warm-up epochs', bounds=NON_NEGATIVE)
    warmup_lr: float = field(1e-6, 'warm-up start learning rate', bounds=NON_NEGATIVE)
    clip_grad: Optional[float] = field(None, 'clip the weights\' gradient norm to this', bounds=POSITIVE)
    epochs: int = field(10, 'training epochs', bounds=AT_LEAST_ONE)
    sched_epochs: Optional[int] = field(None, 'length of the weight lr cosine in epochs (default: --sched-offset + '
                                        '--epochs); longer than the run leaves it mid-schedule, for a fine-tune '
                                        'that continues it (README: one schedule for search and fine-tune)',
                                        bounds=AT_LEAST_ONE)
    sched_offset: int = field(0, 'epochs of the schedule already run (by the search this run continues)',
                              bounds=NON_NEGATIVE)
    batch_size: int = field(64, 'batch size per process', bounds=AT_LEAST_ONE)
    workers: int = field(4, 'data loader workers', bounds=NON_NEGATIVE)
    seed: int = field(0, 'random seed', bounds=NON_NEGATIVE)
    amp: bool = field(False, 'mixed precision: bf16 on CPU, fp16 on CUDA')
    device: Optional[str] = field(None, 'cpu, cuda or cuda:N (default: cuda if available)')
    compile: Optional[bool] = field(None, 'torch.compile the training forward (and the search\'s FLOPs model); '
                                    '--no-compile runs eagerly. Default: on for CUDA, off on the CPU, where a short '
                                    'run does not win back the compile time (README: compiled search step)')
    compile_mode: str = field('default', 'torch.compile mode (reduce-overhead: CUDA graphs, for static shapes)',
                              choices=('default', 'reduce-overhead', 'max-autotune'))
    output_dir: Optional[str] = field(None, 'where the run writes its files')
    resume: Optional[str] = field(None, 'continue from this checkpoint-last.pth')
    max_steps: Optional[int] = field(None, 'stop after this many steps in total (smoke runs)', bounds=AT_LEAST_ONE)
    ckpt_every: int = field(0, 'also write checkpoint-last.pth every N steps (0: each epoch only)', bounds=NON_NEGATIVE)
    log_every: int = field(10, 'steps between log.jsonl records', bounds=AT_LEAST_ONE)
    eval_batch_size: Optional[int] = field(None, 'eval batch size (default: 2 x batch size)', bounds=AT_LEAST_ONE)


@dataclass
class DistillOptions:
    distill: str = field('none', 'distillation from a teacher: none, soft (KL at --distill-tau) or hard (DeiT)',
                         choices=('none', 'soft', 'hard'))
    distill_alpha: float = field(0.5, 'weight of the distillation term; the task loss gets 1 - alpha', bounds=FRACTION)
    distill_tau: float = field(1.0, 'soft distillation temperature', bounds=POSITIVE)
