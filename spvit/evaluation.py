"""tools/eval.py: accuracy, speed, FLOPs and parameters of a pruned model or a timm baseline."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch

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
    pruned: Optional[str] = field(None, 'pruned spvit checkpoint (without it: the timm --model/--checkpoint)')
    onnx: Optional[str] = field(None, 'an ONNX file written by tools/export.py --onnx, run by ONNX Runtime on the CPU '
                                'with its recorded data config (an int8 file is compared with the fp32 file it came from)')
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


def onnx_data_config(cfg: EvalConfig, metadata: Dict[str, Any]) -> Dict[str, Any]:
    """The data config an ONNX file records, with the flags' overrides."""
    from .deploy import META_DATA_CONFIG
    recorded = dict(metadata.get(META_DATA_CONFIG) or {})
    if 'input_size' not in recorded:
        raise ConfigError(f'{cfg.onnx} records no data config (not written by tools/export.py --onnx)')
    for key in ('interpolation', 'mean', 'std', 'crop_pct'):
        if getattr(cfg, key) is not None:
            recorded[key] = list(getattr(cfg, key)) if key in ('mean', 'std') else getattr(cfg, key)
    return recorded


def run_eval(cfg: EvalConfig) -> Dict[str, Any]:
    if not cfg.data_dir:
        raise ConfigError('no --data-dir given')
    if cfg.onnx and (cfg.pruned or cfg.checkpoint):
        raise ConfigError('--onnx evaluates the ONNX file alone: drop --pruned/--checkpoint')
    if cfg.onnx and cfg.device not in (None, 'cpu'):
        raise ConfigError('--onnx runs on ONNX Runtime\'s CPU provider: drop --device')
    device = torch.device('cpu') if cfg.onnx else resolve_device(cfg.device, Dist())
    classes = D.select_classes(cfg.data_dir, cfg.subset_classes, cfg.class_list, splits=('val',))
    if cfg.onnx:
        from .deploy import META_PROVENANCE, META_QUANTIZED_FROM, OnnxModel
        model = OnnxModel(cfg.onnx)
        data_config = onnx_data_config(cfg, model.metadata)
        if model.num_classes != len(classes):
            raise ConfigError(f'{cfg.onnx} has {model.num_classes} classes but {cfg.data_dir}/val has {len(classes)}')
    else:
        model, data_config = load_for_eval(cfg, len(classes))
        model.to(device)
    val = D.image_folder(os.path.join(cfg.data_dir, 'val'), classes, cfg.samples_per_class, D.eval_transform(data_config))
    loader = D.eval_loader(val, cfg.batch_size, cfg.workers)
    start = time.perf_counter()
    metrics = evaluate(model, loader, device, Dist(), cfg.amp and not cfg.onnx)
    seconds = time.perf_counter() - start
    result = {'model': cfg.onnx or cfg.pruned or cfg.model, 'top1': metrics['top1'], 'top5': metrics['top5'],
              'loss': metrics['loss'], 'images': metrics['count'], 'images_per_s': metrics['count'] / seconds,
              'device': 'onnxruntime-cpu' if cfg.onnx else str(device)}
    if cfg.onnx:
        gflops = (model.metadata.get(META_PROVENANCE) or {}).get('achieved_gflops')
        result.update(gflops=gflops, flops=None if gflops is None else int(gflops * 1e9), params=model.num_parameters())
        source = model.metadata.get(META_QUANTIZED_FROM)
        if source and os.path.isfile(source):      # an int8 file: the top-1 change from its fp32 source
            reference = evaluate(OnnxModel(source), loader, device, Dist())
            result.update(fp32=source, fp32_top1=reference['top1'], top1_change=metrics['top1'] - reference['top1'])
        return result
    flops, _ = measure_flops(model, tuple(data_config['input_size']))
    return {**result, 'flops': flops, 'gflops': flops / 1e9, 'params': count_params(model)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(EvalConfig, 'eval.py', 'Evaluate a pruned spvit model, its ONNX file or a timm baseline.', argv)
    if cfg.onnx:
        from .deploy import require_onnx
        require_onnx()
    r = run_eval(cfg)
    if cfg.json:
        print(json.dumps(r))
        return 0
    gflops = 'GFLOPs not recorded' if r['gflops'] is None else f"{r['gflops']:.4f} GFLOPs"
    print(f"{r['model']}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  "
          f"({r['images']} images, {r['images_per_s']:.1f} images/s on {r['device']})\n"
          f"{gflops}, {r['params'] / 1e6:.3f} M params")
    if 'fp32_top1' in r:
        print(f"int8 against its fp32 source {r['fp32']}: top-1 {r['fp32_top1']:.2f}% -> {r['top1']:.2f}% "
              f"({r['top1_change']:+.2f} points)")
    return 0
