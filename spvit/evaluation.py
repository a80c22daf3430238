"""tools/eval.py: accuracy, speed, FLOPs and parameters of a pruned model or a timm baseline."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence


from . import data as D
from .cli import parse_config
from .config import AT_LEAST_ONE, NON_NEGATIVE, ConfigError, field
from .flops import measure_flops
from .models import create_model
from .options import DataOptions, ModelOptions
from .pruned import read_pruned
from .report import count_params
from .runtime import Dist, evaluate, resolve_device


@dataclass
class EvalConfig(ModelOptions, DataOptions):
    pruned: Optional[str] = field(None, 'exported spvit checkpoint (without it: the timm --model/--checkpoint)')
    batch_size: int = field(128, 'eval batch size', bounds=AT_LEAST_ONE)
    workers: int = field(4, 'data loader workers', bounds=NON_NEGATIVE)
    device: Optional[str] = field(None, 'cpu, cuda or cuda:N (default: cuda if available)')
    amp: bool = field(False, 'mixed precision: bf16 on CPU, fp16 on CUDA')
    json: bool = field(False, 'print one JSON object instead of the text report')


def load_for_eval(cfg: EvalConfig, num_classes: int):
    """The model to evaluate and its data config (the checkpoint's, unless flags say otherwise)."""
    if cfg.pruned:
        pm = read_pruned(cfg.pruned)
        model, recorded, name = pm.model, pm.data_config, cfg.pruned
    else:
        kwargs = dict(cfg.model_kwargs)
        if cfg.img_size:
            kwargs['img_size'] = cfg.img_size
        model = create_model(cfg.model, kwargs, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                             num_classes=cfg.num_classes or num_classes)
        recorded, name = {}, cfg.model
    if model.num_classes != num_classes:
        raise ConfigError(f'{name} has {model.num_classes} classes but {cfg.data_dir}/val has {num_classes}')
    data_config = D.data_config(model, None, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    for key in ('interpolation', 'mean', 'std', 'crop_pct'):
        if getattr(cfg, key) is None and key in recorded:
            data_config[key] = recorded[key]
    return model.eval(), data_config


def run_eval(cfg: EvalConfig) -> Dict[str, Any]:
    if not cfg.data_dir:
        raise ConfigError('no --data-dir given')
    device = resolve_device(cfg.device, Dist())
    classes = D.select_classes(cfg.data_dir, cfg.subset_classes, cfg.class_list, splits=('val',))
    model, data_config = load_for_eval(cfg, len(classes))
    model.to(device)
    val = D.image_folder(os.path.join(cfg.data_dir, 'val'), classes, cfg.samples_per_class, D.eval_transform(data_config))
    loader = D.eval_loader(val, cfg.batch_size, cfg.workers)
    start = time.perf_counter()
    metrics = evaluate(model, loader, device, Dist(), cfg.amp)
    seconds = time.perf_counter() - start
    flops, _ = measure_flops(model, tuple(data_config['input_size']))
    return {
        'model': cfg.pruned or cfg.model, 'top1': metrics['top1'], 'top5': metrics['top5'], 'loss': metrics['loss'],
        'images': metrics['count'], 'images_per_s': metrics['count'] / seconds, 'flops': flops,
        'gflops': flops / 1e9, 'params': count_params(model), 'device': str(device),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(EvalConfig, 'eval.py', 'Evaluate an exported spvit model or a timm baseline.', argv)
    r = run_eval(cfg)
    if cfg.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  "
              f"({r['images']} images, {r['images_per_s']:.1f} images/s on {r['device']})\n"
              f"{r['gflops']:.4f} GFLOPs, {r['params'] / 1e6:.3f} M params")
    return 0
