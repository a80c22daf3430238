#!/usr/bin/env bash
# CUDA paths end to end on a GPU machine: search with fp16 AMP (GradScaler), export, distilled
# fine-tune with AMP, eval, and GPU timings (search-step cost, exported-model latency).
#   bash benchmarks/cuda_check.sh OUTDIR
set -euo pipefail
out=${1:-/tmp/spvit-cuda}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"
$py -c "from spvit.synthetic import make_image_folder; make_image_folder('$out/data', 4, 64, 16)"
model=(--model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=4 embed_dim=64 depth=4 num_heads=4)
data=(--data-dir "$out/data" --mean .5 .5 .5 --std .5 .5 .5 --crop-pct 1.0 --workers 2 --batch-size 32 --device cuda --amp)
$py tools/search.py "${model[@]}" "${data[@]}" --output-dir "$out/search" --target-ratio 0.6 --epochs 3 2>&1 | grep -v 'it/s'
$py tools/export.py --search "$out/search/search-final.pth" --output "$out/pruned.pth" --force
$py tools/finetune.py --pruned "$out/pruned.pth" "${data[@]}" --output-dir "$out/ft" --epochs 2 --distill soft \
    --teacher "$out/pruned.pth" --model-ema 2>&1 | grep -v 'it/s'
$py tools/eval.py --pruned "$out/ft/best.pth" --data-dir "$out/data" --mean .5 .5 .5 --std .5 .5 .5 --crop-pct 1.0 --device cuda --json
$py benchmarks/search_step.py --model deit_tiny_patch16_224 --batch-size 64 --rounds 1 --steps 10 --device cuda
$py tools/benchmark.py --arch configs/deit_small_latency_arch.yaml --device cuda --batch-sizes 1 64 256
