"""token_mask: the one reading of `positions` (steering, labels, steerability)."""

from __future__ import annotations

import pytest
import torch

from sae_lens_multimodal import HookedViTConfig
from sae_lens_multimodal.steering import token_mask


def _cfg(**kw) -> HookedViTConfig:
    base = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, image_size=32, patch_size=8)
    base.update(kw)
    return HookedViTConfig(**base)


def test_named_positions_on_a_vit_with_registers() -> None:
    cfg = _cfg(n_registers=2)  # CLS + 2 registers + 4x4 patches
    n = 1 + 2 + 16
    assert cfg.n_prefix_tokens == 3
    assert token_mask("all", n, cfg).all()
    assert token_mask("cls", n, cfg).nonzero().flatten().tolist() == [0]
    assert token_mask("patches", n, cfg).nonzero().flatten().tolist() == list(range(3, n))


def test_spatial_mask_is_resampled_onto_the_patch_grid_and_skips_prefix_tokens() -> None:
    cfg = _cfg()
    left = torch.zeros(32, 32, dtype=torch.bool)
    left[:, :16] = True  # the left half of the image -> the left two columns of the 4x4 grid
    mask = token_mask(left, 17, cfg)
    assert not mask[0]
    assert mask[1:].reshape(4, 4)[:, :2].all() and not mask[1:].reshape(4, 4)[:, 2:].any()


def test_indices_tensors_and_bool_masks() -> None:
    assert token_mask([0, 2], 4).tolist() == [True, False, True, False]
    assert token_mask(torch.tensor([-1]), 4).tolist() == [False, False, False, True]
    flat = torch.tensor([True, False, False, True])
    assert torch.equal(token_mask(flat, 4), flat)


def test_errors_name_the_problem() -> None:
    with pytest.raises(IndexError, match="out of range: 'h' has 4 positions"):
        token_mask([4], 4, where="'h'")
    with pytest.raises(ValueError, match="needs a vision-transformer hook"):
        token_mask("cls", 4)
    with pytest.raises(ValueError, match="no CLS token"):
        token_mask("cls", 16, _cfg(has_cls_token=False, n_pos_prefix_tokens=0, pool_type="mean"))
    with pytest.raises(ValueError, match="one entry per position"):
        token_mask(torch.ones(3, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="'all', 'cls', 'patches'"):
        token_mask("middle", 4)
