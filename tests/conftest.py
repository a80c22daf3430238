import pytest
import timm
import torch

from helpers import SMALL, supernet_and_original


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    """4 classes x 64 train / 16 val synthetic 32x32 images, learnable by class."""
    from spvit.synthetic import make_image_folder
    return make_image_folder(str(tmp_path_factory.mktemp('images')), num_classes=4, train_per_class=64, val_per_class=16)


@pytest.fixture(scope='session')
def pretrained(image_folder, tmp_path_factory):
    """A small ViT trained briefly on the synthetic images: the 'pretrained' model searches start from."""
    import spvit.data as D
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                              num_classes=4)
    cfg = {'input_size': [3, 32, 32], 'interpolation': 'bicubic', 'mean': [.5] * 3, 'std': [.5] * 3, 'crop_pct': 1.0}
    classes = D.select_classes(image_folder)
    ds = D.image_folder(image_folder + '/train', classes, None, D.eval_transform(cfg))
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(6):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = str(tmp_path_factory.mktemp('weights') / 'pretrained.pth')
    torch.save({'model': model.state_dict()}, path)
    return path


@pytest.fixture
def small_supernet():
    return supernet_and_original('vit_tiny_patch16_224', **SMALL)
