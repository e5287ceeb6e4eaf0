"""ForgetOptions: defaults, validation with errors naming the option, the record kept in a patch."""
import pytest

from fmn.forgetting.options import BACKENDS, PATCH_DTYPES, PRECISIONS, TRAIN_SETS, ForgetOptions, templates


def test_defaults_and_lr_per_trainable_set():
    assert ForgetOptions().lr == 2e-6 and ForgetOptions(train="lora").lr == 1e-4 and ForgetOptions(lr=1e-3).lr == 1e-3
    assert ForgetOptions(retain="dog").retain == ("dog",) and ForgetOptions(anchor=" ").anchor == ()


@pytest.mark.parametrize("bad, name", [
    (dict(steps=0), "steps"), (dict(steps=True), "steps"), (dict(batch_size=0), "batch_size"),
    (dict(train="all"), "train"), (dict(loss="l2"), "loss"), (dict(precision="fp8"), "precision"),
    (dict(patch_dtype="fp8"), "patch_dtype"), (dict(lr=-1.0), "lr"), (dict(resolution=30), "resolution"),
    (dict(timesteps=(5, 5)), "timesteps"), (dict(backend="cuda"), "backend"), (dict(retain=[""]), "retain"),
    (dict(retain_samples=0), "retain_samples"), (dict(anchor=[""]), "anchor"), (dict(anchor_weight=0), "anchor_weight"),
    (dict(template=["no slot"]), "template"),
])
def test_bad_options_name_the_option(bad, name):
    with pytest.raises(ValueError, match=name):
        ForgetOptions(**bad)


def test_record_drops_what_only_concerns_this_process():
    rec = ForgetOptions(retain=("dog",)).record()
    assert not {"progress", "device", "base_model", "inplace", "offload"} & set(rec)
    assert rec["retain"] == ["dog"] and rec["timesteps"] == [0, 1000]  # as a patch file gives it back


def test_templates_and_choices():
    assert templates("object") == ["a photo of {}"] and templates("{} at noon") == ["{} at noon"]
    assert set(PRECISIONS) == {"fp32", "bf16", "fp16"} and "exact" in PATCH_DTYPES
    assert TRAIN_SETS[-1] == "lora" and BACKENDS == ("auto", "triton", "cpu", "reference")
