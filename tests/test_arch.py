"""The architecture spec: file form, validation, and the errors for models spvit does not support."""
import pytest
import timm

import spvit
from spvit import Architecture, ArchitectureError, BlockArch, UnsupportedModelError


@pytest.mark.parametrize('suffix', ['.yaml', '.json'])
def test_round_trip(tmp_path, small_supernet, suffix):
    supernet, _ = small_supernet
    arch = supernet.architecture()
    arch.blocks[0] = BlockArch('conv3x3', 17)
    path = str(tmp_path / f'arch{suffix}')
    arch.save(path)
    loaded = Architecture.load(path)
    assert loaded == arch
    assert loaded.model_kwargs['img_size'] == 32
    supernet.validate(loaded)


def test_yaml_form_from_the_docs(tmp_path):
    path = tmp_path / 'arch.yaml'
    path.write_text('model: deit_small_patch16_224\nmodel_kwargs: {}\nblocks:\n'
                    '  - {attn: conv1x1, mlp_hidden: 1304}\n  - {attn: msa, mlp_hidden: 1399}\n')
    arch = Architecture.load(str(path))
    assert arch.blocks == [BlockArch('conv1x1', 1304), BlockArch('msa', 1399)]


@pytest.mark.parametrize('text,message', [
    ('model: m\nblocks:\n  - {attn: conv5x5, mlp_hidden: 3}\n', "unknown attention op 'conv5x5'"),
    ('model: m\nblocks:\n  - {attn: msa, mlp_hidden: 0}\n', 'mlp_hidden must be at least 1'),
    ('model: m\nblocks:\n  - {attn: msa, mlp_hidden: 2.5}\n', 'mlp_hidden must be an integer'),
    ('model: m\nblocks:\n  - {attn: msa}\n', 'block 0 must be'),
    ('model: m\nblocks: []\n', "'blocks' must be a non-empty list"),
    ('blocks:\n  - {attn: msa, mlp_hidden: 3}\n', "'model' must be a timm model name"),
    ('model: m\nblocks: [\n', 'not valid YAML'),
    ('- just\n- a list\n', 'expected a mapping'),
])
def test_malformed_files(tmp_path, text, message):
    path = tmp_path / 'arch.yaml'
    path.write_text(text)
    with pytest.raises(ArchitectureError, match=message.replace('[', r'\[')):
        Architecture.load(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ArchitectureError, match='cannot read architecture file'):
        Architecture.load(str(tmp_path / 'nope.yaml'))


def test_validation_against_model(small_supernet):
    supernet, _ = small_supernet
    arch = supernet.architecture()
    short = Architecture(arch.model, arch.blocks[:-1], arch.model_kwargs)
    with pytest.raises(ArchitectureError, match='has 3 blocks but .* has 4'):
        supernet.validate(short)
    with pytest.raises(ArchitectureError, match='has 3 blocks'):
        supernet.pin(short)
    wide = Architecture(arch.model, [BlockArch('msa', 257)] + arch.blocks[1:], arch.model_kwargs)
    with pytest.raises(ArchitectureError, match='block 0: mlp_hidden 257 exceeds the model.s 256'):
        supernet.validate(wide)
    with pytest.raises(ArchitectureError, match="for model 'x'"):
        Architecture('x', arch.blocks).validate([256] * 4, model='vit_tiny_patch16_224')


@pytest.mark.parametrize('name,kwargs,message', [
    ('resnet18', {}, 'ResNet is not supported; spvit supports timm VisionTransformer'),
    ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=1, qk_norm=True, norm_layer='rmsnorm'),
     'qk_norm with RmsNorm is not supported'),
    ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=1, dynamic_img_size=True), 'dynamic_img_size'),
    ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=1, patch_drop_rate=0.1), 'patch dropout'),
    ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=1, scale_mlp_norm=True, norm_layer='rmsnorm'),
     'MLP Mlp with an inner RmsNorm is not supported'),
])
def test_unsupported_models(name, kwargs, message):
    model = timm.create_model(name, **kwargs)
    with pytest.raises(UnsupportedModelError, match=message):
        spvit.attach_search_space(model)
