"""Forgetting works on the built-in toy model: a small version of bench/bench_quality.py.

Forget "circle" with fmn's default options for the toy model (the closed-form edit, no options given: the
family supplies them) and with its attention-loss rule (retain term and anchor included), then generate
the 25-prompt set with 2 seeds from the base and the patched model and classify. Fails when forgetting
stops working (circles still drawn) or when it stops being specific (other shapes or the colours
collapse). Bounds sit below the figures at 2 seeds (both: UA 1.0, retain 1.00 / 1.00 of base) by about the
noise of 10 forgotten-prompt images and 40 retained ones: 1 and 2 of them for the closed form, whose bar is
the issue's (0.95), 2 and 4 for the attention rule.
"""
import copy

import pytest
import torch

import fmn
from fmn.toy import evaluate, load_classifier, relative_to
from fmn.toy.defaults import attention_defaults

SEEDS = [0, 1]


@pytest.fixture(scope="module")
def base(toy_base):  # tests/conftest.py: the toy pipeline, loaded once per session
    return toy_base


@pytest.mark.parametrize("method, ua_min, retain_min", [("closed-form", 0.9, 0.95), ("attention", 0.8, 0.9)])
def test_forgetting_a_shape_removes_it_and_keeps_the_rest(base, toy_base_eval, method, ua_min, retain_min):
    classifier = load_classifier()
    before = toy_base_eval  # tests/conftest.py: evaluate(base, forgotten="circle", seeds=SEEDS), shared
    assert before["settings"]["seeds"] == SEEDS
    assert before["ua"] <= 0.1 and before["shape_acc"] >= 0.9  # the base model draws circles

    pipe = copy.deepcopy(base)
    if method == "closed-form":  # no options: the built-in model's defaults
        patch = fmn.forget(pipe, "circle", inplace=True, progress=False)
        assert patch.options["closed_form"] and patch.summary["closed_form_layers"] == 14
        assert patch.summary["steps"] == 0 and "loss_after" not in patch.summary
    else:  # reference backend: the kernels have their own tests, and under the interpreter 100 steps take minutes
        patch = fmn.forget(pipe, "circle", inplace=True, progress=False, backend="reference",
                           **attention_defaults("circle"))
        assert patch.summary["loss_after"] < 0.5 * patch.summary["loss_before"]
        assert patch.summary["anchor_loss_after"] < patch.summary["anchor_losses"][0]
    after = evaluate(pipe, forgotten="circle", seeds=SEEDS, classifier=classifier)
    rel = relative_to(after, before)
    assert after["ua"] >= ua_min, after["per_concept"]
    assert rel["in_domain_retain_rel"] >= retain_min, after["per_shape"]
    assert rel["cross_domain_retain_rel"] >= retain_min, after["per_color"]

    # the patch file reproduces it on a fresh copy of the base model
    fresh = fmn.apply(copy.deepcopy(base), patch)
    for (name, a), (_, b) in zip(fresh.unet.named_parameters(), pipe.unet.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)
