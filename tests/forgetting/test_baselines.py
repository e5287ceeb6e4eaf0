"""The ESD-x baseline: trains only the cross-attention set, with a loss that can fall, on UNets and MM-DiTs."""
import torch

from fmn.forgetting.baselines import esd
from fmn.testing import tiny_mmdit_pipeline, tiny_sd_pipeline


def test_esd_trains_attn2_only_and_its_loss_falls():
    pipe = tiny_sd_pipeline("sd1")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    losses = esd(pipe, ["cat"], latents, steps=12, lr=3e-3, batch_size=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".attn2." in n for n in changed)


def test_esd_on_an_mmdit_trains_the_joint_attention_only():
    pipe = tiny_mmdit_pipeline("sd3")
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    c = pipe.transformer.config.in_channels
    latents = torch.randn(2, c, 8, 8, generator=torch.Generator().manual_seed(0))
    losses = esd(pipe, ["cat"], latents, steps=12, lr=3e-3, batch_size=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    changed = {n for n, p in pipe.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".attn." in n for n in changed)
