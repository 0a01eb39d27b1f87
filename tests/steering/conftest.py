import pytest
import torch

from tests.steering._sae import bundled_sae, train_quick_sae, world_images


@pytest.fixture(scope="session")
def clip():
    from sae_lens_multimodal.models.hooked_clip import HookedCLIP

    model = HookedCLIP.from_pretrained("shapes-clip")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def quick_sae(clip):
    """A TopK SAE trained here in a few seconds (training seed 0); ground-truth thresholds were measured on it."""
    torch.manual_seed(0)
    return train_quick_sae(clip)


@pytest.fixture(scope="session")
def vision_sae(request):
    """The bundled shapes-clip SAE when shipped, else the quick SAE."""
    sae = bundled_sae()
    return sae if sae is not None else request.getfixturevalue("quick_sae")


@pytest.fixture(scope="session")
def images():
    return world_images(8, seed=3)[0]
