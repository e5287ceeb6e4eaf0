"""Trainable sets: the parameters trained in fp32, the base weights given back exactly or the
trained ones kept; a LoRA adapter added, merged on request and removed; lora_scale."""
import copy

import pytest
import torch

from fmn.families import family_for
from fmn.forgetting.options import ForgetOptions
from fmn.forgetting.restore import PipelineState
from fmn.testing import tiny_sd_pipeline
from fmn.forgetting.trainable import TrainableSet, lora_scale


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd_pipeline("sd1")


def weights(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("keep", [False, True])
def test_a_named_set_trains_in_fp32_and_gives_back_or_keeps_the_weights(sd1, keep):
    pipe = copy.deepcopy(sd1)
    pipe.unet.half()
    before, flags = weights(pipe.unet), [p.requires_grad for p in pipe.unet.parameters()]
    state = PipelineState(pipe, pipe.unet)
    ts = TrainableSet(family_for(pipe), ForgetOptions(train="attn2-kv")).setup()
    assert ts.named and all(".attn2.to_k." in n or ".attn2.to_v." in n for n, _ in ts.named)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in ts.params)
    assert set(ts.fingerprint["tensors"]) == {"unet." + n for n, _ in ts.named}
    with torch.no_grad():
        for p in ts.params:
            p.add_(1.0)
    ts.restore(keep=keep)
    state.restore()
    after = weights(pipe.unet)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == ({n for n, _ in ts.named} if keep else set())
    assert all(v.dtype == torch.float16 for v in after.values())
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags  # PipelineState put them back


@pytest.mark.parametrize("keep", [False, True])
def test_lora_is_added_merged_on_request_and_removed(sd1, keep):
    pipe = copy.deepcopy(sd1)
    before = weights(pipe.unet)
    ts = TrainableSet(family_for(pipe), ForgetOptions(train="lora", lora_rank=2, lora_alpha=4)).setup()
    assert ts.lora and all("lora_" in n for n, _ in ts.named)
    with torch.no_grad():
        for n, p in ts.named:
            if ".lora_B." in n:
                p.fill_(0.1)
    trained = ts.trained()
    assert any(".lora_A." in k for k in trained) and all(v.device.type == "cpu" for v in trained.values())
    ts.restore(keep=keep)
    after = weights(pipe.unet)
    assert after.keys() == before.keys()  # the adapter is gone
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert bool(changed) == keep and all(".attn2." in k for k in changed)


def test_lora_scale():
    assert lora_scale(ForgetOptions(lora_rank=4)) == 1.0
    assert lora_scale(ForgetOptions(lora_rank=4, lora_alpha=8)) == 2.0
