"""A folder of images as a data set: labels from class subfolders, crop/resize, errors."""

import numpy as np
import PIL.Image
import pytest

from diffusion_jax import data


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def _eval_all(source, batch_size=4):
    batches = list(data.eval_iterator(source, batch_size=batch_size, shard_index=0, shard_count=1))
    mask = np.concatenate([b["mask"] for b in batches])
    return {k: np.concatenate([b[k] for b in batches])[mask] for k in batches[0] if k != "mask"}


def test_flat_folder_without_labels(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):  # mixed sizes and modes: each is centre-cropped to a square and resized
        shape = (40, 30, 3) if i % 2 else (24, 24)
        _save(tmp_path / f"img{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image, not data")
    source = data.load("folder", folder_path=tmp_path, image_size=16)
    assert len(source) == 5 and source.info.shape == (16, 16, 3)
    assert source.info.num_classes is None and source.info.num_levels == 256
    out = _eval_all(source)
    assert set(out) == {"image"} and out["image"].shape == (5, 16, 16, 3)
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0


def test_class_subfolders_give_sorted_labels(tmp_path):
    for label, name in enumerate(["cat", "dog", "emu"]):
        for i in range(label + 1):
            _save(tmp_path / name / f"{i}.png", np.full((8, 8, 3), 40 * label, np.uint8))
    source = data.load("FOLDER", folder_path=tmp_path, image_size=8)
    assert source.info.num_classes == 3 and len(source) == 6
    out = _eval_all(source)
    np.testing.assert_array_equal(out["label"], [0, 1, 1, 2, 2, 2])
    # The constant colour identifies the class folder: labels travel with their images.
    np.testing.assert_allclose(out["image"][:, 0, 0, 0], 40 * out["label"] / 255.0, rtol=1e-6)


def test_channels_are_detected_and_a_mismatch_refused(tmp_path):
    """Colour images are never trained as grey by mistake: the folder's channel count comes from
    its images, and a num_channels that disagrees stops with one message."""
    grey, colour = tmp_path / "grey", tmp_path / "colour"
    _save(grey / "a.png", np.full((12, 12), 255, np.uint8))
    palette = PIL.Image.fromarray(np.zeros((12, 12), np.uint8), mode="L").convert("P")  # a palette of greys
    palette.save(grey / "b.png")
    source = data.load("folder", folder_path=grey, image_size=6)
    assert source.info.shape == (6, 6, 1)
    out = _eval_all(source)
    np.testing.assert_allclose(out["image"][0], 1.0)
    _save(colour / "a.png", np.full((12, 12), 7, np.uint8))
    _save(colour / "b.png", np.full((12, 12, 3), 255, np.uint8))
    assert data.load("folder", folder_path=colour, image_size=6).info.shape == (6, 6, 3)
    with pytest.raises(
        ValueError, match=r"holds colour images \(e.g. .*b.png\), so 3 channel\(s\), but num_channels=1"
    ):
        data.load("folder", folder_path=colour, image_size=6, num_channels=1)
    with pytest.raises(ValueError, match=r"holds only greyscale images, so 1 channel\(s\), but num_channels=3"):
        data.load("folder", folder_path=grey, image_size=6, num_channels=3)


def test_unreadable_file_is_named_when_the_folder_is_opened(tmp_path):
    _save(tmp_path / "good.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(data.UnreadableImageError, match="broken.png"):
        data.load("folder", folder_path=tmp_path, image_size=8)


def test_truncated_file_is_named_when_read(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    _save(tmp_path / "b.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    content = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(content[: len(content) // 2])  # a valid header, no pixels
    source = data.load("folder", folder_path=tmp_path, image_size=8)  # headers are fine
    with pytest.raises(data.UnreadableImageError, match="b.png"):
        _eval_all(source)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="folder_path is required"):
        data.load("folder", image_size=8)
    with pytest.raises(ValueError, match="image_size is required"):
        data.load("folder", folder_path=tmp_path)
    with pytest.raises(ValueError, match="contains no images"):
        data.load("folder", folder_path=tmp_path, image_size=8)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.load("folder", folder_path=tmp_path / "missing", image_size=8)
    _save(tmp_path / "top.png", np.zeros((4, 4, 3), np.uint8))
    _save(tmp_path / "cls" / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="mixes images"):
        data.load("folder", folder_path=tmp_path, image_size=4)


def test_the_folder_config_takes_its_channels_from_the_images(tmp_path):
    """configs/folder/edm.py leaves num_channels to the images: a run on colour images builds a
    3-channel network (checked at start-up, before any work)."""
    import pathlib

    from diffusion_jax.builders.config import load_config
    from diffusion_jax.modes import setup

    root = pathlib.Path(__file__).resolve().parent.parent
    for i in range(3):
        _save(tmp_path / "images" / f"{i}.png", np.full((40, 40, 3), 60 * i, np.uint8))
    config = load_config(str(root / "configs" / "folder" / "edm.py"))
    config.data.folder_path = str(tmp_path / "images")
    run = setup.prepare(config, tmp_path / "work", create=True)
    assert run.config.data.num_channels == 3 and run.exp.input_shape == (32, 32, 3)
