"""Smoke pipeline until the full demo lands: attach the search space to a small ViT, take a few
search steps on random data, read off the architecture and check its FLOPs with fvcore."""
import timm
import torch
import torch.nn.functional as F

import spvit
from spvit.flops import measure_flops


def main() -> None:
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, num_classes=10)
    model = timm.create_model('vit_tiny_patch16_224', **kwargs)
    supernet = spvit.attach_search_space(model, theta0=0.5, model_name='vit_tiny_patch16_224', model_kwargs=kwargs)
    target = 0.6 * supernet.original_flops / 1e9
    opt = torch.optim.AdamW(supernet.gate_parameters(), lr=0.05, weight_decay=0)
    supernet.train()
    for step in range(30):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        loss = F.cross_entropy(supernet(x), y) + 5 * ((supernet.flops() - target) / target) ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    arch = supernet.architecture()
    supernet.pin_current()
    measured, _ = measure_flops(supernet, supernet.input_size)
    for i, b in enumerate(arch.blocks):
        print(f'block {i}: {b.attn:8s} mlp {b.mlp_hidden}/{supernet.block_dims[i].hidden}')
    print(f'original {supernet.original_flops / 1e9:.4f} GFLOPs, target {target:.4f}, '
          f'searched {supernet.arch_flops(arch) / 1e9:.4f} (analytic) / {measured / 1e9:.4f} (fvcore)')


if __name__ == '__main__':
    main()
