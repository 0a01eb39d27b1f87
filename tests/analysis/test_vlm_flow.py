"""Attention knockout (analysis/vlm_flow.py) on a tiny random LLaVA: what blocking attention to the image
tokens must do whatever the weights are.

* knocking out nothing changes nothing;
* blocking every text position in every layer cuts the answer off from the image: the logits at the text
  positions no longer depend on the image (in a forward and throughout ``generate``), while they do without;
* blocking the answer position leaves it exactly zero attention to the image tokens, and no other position
  changes in the layers before the answer position reads anything.
"""

import pytest
import torch

from sae_lens_multimodal.analysis.vlm_flow import attention_knockout, image_knockout_hooks, layer_windows
from sae_lens_multimodal.models.vlm import HookedVLM
from sae_lens_multimodal.testing import tiny_random_llava

IMG = 255


@pytest.fixture(scope="module")
def model():
    return HookedVLM.from_pretrained(tiny_random_llava("llava", "llama", seed=3))


def batch():
    a = [1, 5, 6] + [IMG] * 16 + [7, 8, 9, 10]
    b = [0, 0, 1, 11] + [IMG] * 16 + [12, 13, 14]
    ids = torch.tensor([a, b])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def pixels(seed):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_no_window_changes_nothing(model):
    ids, mask = batch()
    res = attention_knockout(model, ids, pixels(0), [20, 21], windows=[(0, 0), (0, 2)], attention_mask=mask)
    assert torch.equal(res.answer_prob[0], res.clean_prob) and torch.equal(res.top_token[0], res.clean_top)
    assert res.changed[0] == 0 and res.drop[0] == 0
    assert (res.answer_prob[1] - res.clean_prob).abs().max() > 1e-4  # knocking out every layer does something


def test_text_knockout_in_every_layer_cuts_the_image_off(model):
    ids, mask = batch()
    hooks = image_knockout_hooks(model, ids, range(model.lm.cfg.n_layers), queries="text", attention_mask=mask)
    text = model.text_token_mask(ids, mask)
    with torch.no_grad():
        plain = [model(ids, pixels(s), attention_mask=mask) for s in (0, 1)]
        knocked = [model.run_with_hooks(ids, pixels(s), attention_mask=mask, fwd_hooks=hooks) for s in (0, 1)]
    assert (plain[0] - plain[1])[text].abs().max() > 1e-3  # the image matters ...
    assert (knocked[0] - knocked[1])[text].abs().max() < 1e-5  # ... until no text token may read it
    # generate (key/value cache: one query per step) keeps the knockout on the generated tokens too
    with model.hooks(fwd_hooks=hooks):
        outs = [model.generate(ids, pixels(s), attention_mask=mask, max_new_tokens=4, stop_at_eos=False) for s in (0, 1)]
    assert torch.equal(outs[0], outs[1])


def test_answer_knockout_blocks_only_the_answer_position(model):
    ids, mask = batch()
    layers = [1]
    hooks = image_knockout_hooks(model, ids, layers, queries="answer", attention_mask=mask)
    seen = {}

    def keep(pattern, hook):
        seen[hook.name] = pattern

    image = model.image_token_mask(ids)
    with torch.no_grad():
        clean = model(ids, pixels(0), attention_mask=mask)
        logits = model.run_with_hooks(ids, pixels(0), attention_mask=mask,
                                      fwd_hooks=hooks + [("lm.blocks.1.attn.hook_pattern", keep)])
    pattern = seen["lm.blocks.1.attn.hook_pattern"]  # [b, h, q, k]
    last = ids.shape[1] - 1  # left padding: every row ends at the last position
    to_image = (pattern[:, :, last] * image[:, None].float()).sum(-1)
    assert to_image.abs().max() == 0
    earlier = (pattern[:, :, :last] * image[:, None, None].float()).sum(-1)
    assert earlier.max() > 0.01  # other positions still read the image
    real = mask.bool().clone()
    real[:, last] = False
    assert (logits - clean)[real].abs().max() < 1e-5  # only the answer position changes
    assert (logits - clean)[:, last].abs().max() > 1e-5


def test_windows_and_bad_arguments(model):
    assert layer_windows(2) == [(0, 0), (0, 1), (1, 2), (0, 2)]
    assert layer_windows(3, window=2) == [(0, 0), (0, 2), (1, 3), (0, 3)]
    ids, mask = batch()
    with pytest.raises(ValueError, match="wider"):
        layer_windows(2, window=3)
    with pytest.raises(ValueError, match="queries"):
        image_knockout_hooks(model, ids, [0], queries="image")
    with pytest.raises(ValueError, match="n_layers=2"):
        image_knockout_hooks(model, ids, [5])
    with pytest.raises(ValueError, match="no image tokens"):
        image_knockout_hooks(model, torch.tensor([[1, 5, 6]]), [0])
    with pytest.raises(ValueError, match="one per batch row"):
        attention_knockout(model, ids, pixels(0), [1, 2, 3], attention_mask=mask)
    with pytest.raises(ValueError, match="start <= stop"):
        attention_knockout(model, ids, pixels(0), 1, windows=[(1, 0)], attention_mask=mask)
