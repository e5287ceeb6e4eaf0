"""Reference images: the accepted forms of `images`, reading and centre-cropping files, clear errors."""
import pytest
import torch
from PIL import Image

from fmn.forgetting.references import image_files, image_sources, open_image


def test_the_forms_of_images(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / name / "a.png")
    per_concept = image_sources(tmp_path, ["cat", "dog"])
    assert [p.parent.name for p in per_concept[0] + per_concept[1]] == ["cat", "dog"]
    with pytest.raises(ValueError, match=r"none for \['bird'\]"):
        image_sources(tmp_path, ["cat", "bird"])
    lat = torch.zeros(2, 4, 8, 8)
    assert image_sources(lat, ["a", "b"])[1] is lat
    assert image_sources({"b": [Image.new("RGB", (4, 4))]}, ["a", "b"]).keys() == {1}
    with pytest.raises(ValueError, match="unknown concepts"):
        image_sources({"c": []}, ["a"])
    with pytest.raises(TypeError, match="images must be"):
        image_sources(3, ["a"])


def test_files_are_read_resized_and_centre_cropped(tmp_path):
    img = Image.new("RGB", (40, 20), "black")
    img.paste(Image.new("RGB", (20, 20), "white"), (10, 0))  # the centre square is white
    img.save(tmp_path / "wide.png")
    (tmp_path / "notes.txt").write_text("not an image")
    files = image_files(tmp_path)
    assert [f.name for f in files] == ["wide.png"]
    x = open_image(files[0], 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert x[:, :, 4:12].mean() > 0.9  # white centre kept, in [-1, 1]
    with pytest.raises(FileNotFoundError):
        image_files(tmp_path / "missing")
