"""Model families (see fmn.families.base): `family_for(pipe)` picks the one that handles a pipeline."""
from fmn.families.base import ModelFamily, Prompts
from fmn.families.unet import UNetFamily

# Tried in order; a new family (SD3, FLUX) is one module and one entry here.
FAMILIES: tuple[type[ModelFamily], ...] = (UNetFamily,)


def family_for(pipe) -> ModelFamily:
    """The family that handles `pipe`, constructed on it; a ValueError if none does."""
    for family in FAMILIES:
        if family.matches(pipe):
            return family(pipe)
    raise ValueError(f"{type(pipe).__name__} has no UNet: fmn supports Stable Diffusion 1.x/2.x/XL pipelines")


__all__ = ["ModelFamily", "Prompts", "UNetFamily", "FAMILIES", "family_for"]
