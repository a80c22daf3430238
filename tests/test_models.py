"""Creating models and loading user checkpoints."""
import pytest
import safetensors.torch
import timm
import torch

from spvit.errors import CheckpointError, UnsupportedModelError
from spvit.models import create_model

KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=10, **KW)
    sd = model.state_dict()
    paths = {
        'bare': tmp_path / 'bare.pth', 'model': tmp_path / 'deit_style.pth',
        'state_dict': tmp_path / 'sd.pt', 'safetensors': tmp_path / 'w.safetensors'}
    torch.save(sd, paths['bare'])
    torch.save({'model': sd, 'epoch': 3}, paths['model'])
    torch.save({'state_dict': sd}, paths['state_dict'])
    safetensors.torch.save_file(sd, str(paths['safetensors']))
    return model, paths


@pytest.mark.parametrize('form', ['bare', 'model', 'state_dict', 'safetensors'])
def test_checkpoint_forms(weights, form):
    model, paths = weights
    loaded = create_model('vit_tiny_patch16_224', KW, checkpoint=str(paths[form]), num_classes=10)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_other_num_classes_reinitialises_head(weights):
    model, paths = weights
    loaded = create_model('vit_tiny_patch16_224', KW, checkpoint=str(paths['bare']), num_classes=3)
    assert loaded.head.weight.shape == (3, 32)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_other_img_size_resamples_pos_embed(weights):
    _, paths = weights
    loaded = create_model('vit_tiny_patch16_224', dict(KW, img_size=48), checkpoint=str(paths['bare']), num_classes=10)
    assert loaded.pos_embed.shape[1] == 1 + 36


def test_errors(weights, tmp_path):
    _, paths = weights
    with pytest.raises(UnsupportedModelError, match="unknown timm model 'no_such_vit'"):
        create_model('no_such_vit')
    with pytest.raises(CheckpointError, match='checkpoint not found'):
        create_model('vit_tiny_patch16_224', KW, checkpoint=str(tmp_path / 'missing.pth'))
    with pytest.raises(CheckpointError, match='does not fit the model'):
        create_model('vit_tiny_patch16_224', dict(KW, depth=3), checkpoint=str(paths['bare']), num_classes=10)
    bad = tmp_path / 'trunc.pth'
    bad.write_bytes(paths['bare'].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='cannot read checkpoint'):
        create_model('vit_tiny_patch16_224', KW, checkpoint=str(bad), num_classes=10)
