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
def vision_sae(clip):
    """The bundled shapes-clip SAE when shipped, else a TopK SAE trained here in a few seconds."""
    sae = bundled_sae()
    if sae is None:
        torch.manual_seed(0)
        sae = train_quick_sae(clip)
    return sae


@pytest.fixture(scope="session")
def images():
    return world_images(8, seed=3)[0]
