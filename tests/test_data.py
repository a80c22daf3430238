"""Image folders: class subsets, per-class caps, one class mapping for train and val."""
import os

import pytest

from spvit import data as D


def test_subset_and_caps(image_folder):
    classes = D.select_classes(image_folder, subset_classes=2)
    assert classes == ['class_00', 'class_01']
    train = D.image_folder(os.path.join(image_folder, 'train'), classes, samples_per_class=5)
    val = D.image_folder(os.path.join(image_folder, 'val'), classes)
    assert len(train) == 10 and len(val) == 32
    assert [os.path.basename(p) for p, t in train.reader.samples if t == 0] == [f'{i:04d}.png' for i in range(5)]
    assert {t for _, t in val.reader.samples} == {0, 1}


def test_class_list_sets_the_mapping(image_folder, tmp_path):
    listing = tmp_path / 'classes.txt'
    listing.write_text('class_03\nclass_01\n')
    classes = D.select_classes(image_folder, class_list=str(listing))
    assert classes == ['class_03', 'class_01']
    for split in ('train', 'val'):
        ds = D.image_folder(os.path.join(image_folder, split), classes)
        assert {os.path.basename(os.path.dirname(p)): t for p, t in ds.reader.samples} == {'class_03': 0, 'class_01': 1}


@pytest.mark.parametrize('kwargs,message', [
    (dict(subset_classes=9), 'train/ has 4 classes'),
    (dict(class_list='LIST'), 'not in train/: nope'),
])
def test_errors(image_folder, tmp_path, kwargs, message):
    listing = tmp_path / 'c.txt'
    listing.write_text('nope\n')
    kwargs = {k: (str(listing) if v == 'LIST' else v) for k, v in kwargs.items()}
    with pytest.raises(D.DataError, match=message):
        D.select_classes(image_folder, **kwargs)
    empty = tmp_path / 'empty'
    (empty / 'train').mkdir(parents=True)
    (empty / 'val').mkdir()
    with pytest.raises(D.DataError, match='no class folders'):
        D.select_classes(str(empty))


def test_data_config_follows_the_built_model():
    import timm
    model = timm.create_model('deit_tiny_patch16_224', img_size=96)
    cfg = D.data_config(model)
    assert cfg['input_size'] == [3, 96, 96] and cfg['interpolation'] == 'bicubic'
    assert D.data_config(model, img_size=64, mean=[0.5] * 3)['input_size'] == [3, 64, 64]


def test_a_symlink_loop_does_not_repeat_images(tmp_path):
    """timm's walk follows links: one back up to the split made 6 images into hundreds."""
    from PIL import Image
    for c in ('a', 'b'):
        (tmp_path / 'train' / c).mkdir(parents=True)
        for i in range(3):
            Image.new('RGB', (8, 8)).save(tmp_path / 'train' / c / f'{i}.png')
    (tmp_path / 'train' / 'a' / 'loop').symlink_to('..')
    ds = D.image_folder(str(tmp_path / 'train'), ['a', 'b'])
    assert sorted((os.path.basename(p), t) for p, t in ds.reader.samples) == sorted(
        (f'{i}.png', t) for i in range(3) for t in (0, 1))
