"""Preprocessing must match DUSt3R's load_images (facts §2) pixel-for-pixel in shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pqk.data.images import IMAGE_EXTENSIONS, load_images, motorcycle_pair, normalize, resize_and_crop
from pqk.errors import InputError


def _gradient(width: int, height: int) -> PIL.Image.Image:
    """A non-constant image so resampling and cropping are actually exercised."""
    # Built in uint8 with broadcasting: float temporaries make 4032x3024 slow.
    x = np.linspace(0, 255, width).astype(np.uint8)
    y = np.linspace(0, 255, height).astype(np.uint8)
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    rgb[..., 0] = x[None, :]
    rgb[..., 1] = y[:, None]
    rgb[..., 2] = x[None, :] // 2 + y[:, None] // 2
    return PIL.Image.fromarray(rgb)


@pytest.mark.parametrize(
    ("size_in", "size_out"),
    [
        ((4032, 3024), (512, 384)),
        ((1920, 1080), (512, 288)),
        ((800, 533), (512, 336)),
        ((3024, 4032), (384, 512)),
        ((741, 500), (512, 336)),
        ((100, 50), (512, 256)),  # enlarged (BICUBIC path)
    ],
)
def test_resize_512_worked_examples(size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
    assert resize_and_crop(_gradient(*size_in), 512).size == size_out


def test_resize_224_is_centred_square() -> None:
    # 640x480 -> long side round(224*640/480) = 299 -> 299x224 -> crop 224x224
    assert resize_and_crop(_gradient(640, 480), 224).size == (224, 224)
    assert resize_and_crop(_gradient(480, 640), 224).size == (224, 224)
    assert resize_and_crop(_gradient(224, 224), 224).size == (224, 224)


def test_resize_224_crop_is_centred() -> None:
    # A 2:1 image whose left/right quarters are black and centre white: the
    # centred square crop of the resized 448x224 image must be all white.
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[:, 50:150] = 255
    out = np.asarray(resize_and_crop(PIL.Image.fromarray(rgb), 224))
    assert out.shape == (224, 224, 3)
    assert out[:, 8:-8].min() > 250


def test_square_becomes_4_3_unless_square_ok() -> None:
    img = _gradient(1000, 1000)
    assert resize_and_crop(img, 512).size == (512, 384)
    assert resize_and_crop(img, 512, square_ok=True).size == (512, 512)


def test_normalize_values_and_layout() -> None:
    rgb = np.array([[[0, 128, 255], [255, 0, 64]]], dtype=np.uint8)  # 1x2
    x = normalize(PIL.Image.fromarray(rgb))
    assert x.shape == (1, 3, 1, 2) and x.dtype == torch.float32
    expected = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.equal(x[0], expected)
    assert x[0, 0, 0, 0] == -1.0 and x[0, 2, 0, 0] == 1.0
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_load_in_memory_sources_and_dict_fields() -> None:
    views = load_images([_gradient(800, 533), np.asarray(_gradient(320, 240))])
    assert [v["idx"] for v in views] == [0, 1]
    assert [v["instance"] for v in views] == ["0", "1"]
    first = views[0]
    assert first["img"].shape == (1, 3, 336, 512)
    assert first["true_shape"].dtype == torch.int32
    assert first["true_shape"].tolist() == [[336, 512]]
    assert first["rgb"].shape == (336, 512, 3) and first["rgb"].dtype == np.float32
    assert first["path"] is None
    # rgb is the same picture as img, in [0, 1]
    back = first["img"][0].permute(1, 2, 0).numpy() * 0.5 + 0.5
    np.testing.assert_allclose(first["rgb"], back, atol=1e-6)


def test_motorcycle_pair_loads_to_512x336() -> None:
    left, right = motorcycle_pair()
    assert left.shape == right.shape == (500, 741, 3)
    assert left.dtype == np.uint8
    views = load_images([left, right])
    assert [v["true_shape"].tolist() for v in views] == [[[336, 512]]] * 2


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display: stored landscape, shown portrait
    path = tmp_path / "rotated.jpg"
    _gradient(64, 32).save(path, exif=exif)
    (view,) = load_images([path])
    assert view["true_shape"].tolist() == [[512, 256]]
    assert view["path"] == str(path)


def test_folder_is_read_in_sorted_order_skipping_non_images(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", "c.JPEG"):
        _gradient(64, 48).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    views = load_images(tmp_path)
    assert [Path(v["path"]).name for v in views] == ["a.jpg", "b.png", "c.JPEG"]
    assert load_images(str(tmp_path), size=224)[0]["true_shape"].tolist() == [[224, 224]]


def test_single_file_path(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    _gradient(64, 48).save(path)
    assert len(load_images(path)) == 1


def test_image_extensions() -> None:
    assert {".jpg", ".jpeg", ".png"} <= set(IMAGE_EXTENSIONS)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_images([tmp_path / "nope.png"])
    with pytest.raises(InputError, match="does not exist"):
        load_images(tmp_path / "missing_folder")


def test_non_image_file(tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("hello, I am text")
    with pytest.raises(InputError, match="not an image") as info:
        load_images([fake])
    assert "\n" not in str(info.value)


def test_unsupported_extension_in_list(tmp_path: Path) -> None:
    path = tmp_path / "pic.bmp"
    _gradient(64, 48).save(path)
    with pytest.raises(InputError, match="unsupported image type"):
        load_images([path])


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no images"):
        load_images(tmp_path)


def test_too_small_after_preprocessing(tmp_path: Path) -> None:
    # A 10x10 image is upscaled to 512 (as upstream does), so "too small" means
    # a side under one patch after preprocessing: 1000x10 -> 512x5 -> crop 512x0.
    path = tmp_path / "strip.png"
    _gradient(1000, 10).save(path)
    with pytest.raises(InputError, match=r"strip\.png.*1000x10"):
        load_images([path])
    assert load_images([_gradient(10, 10)])[0]["true_shape"].tolist() == [[384, 512]]


@pytest.mark.parametrize("size", [256, 0, 512.0, "512", True])
def test_bad_size(size: object) -> None:
    with pytest.raises(InputError, match="size must be 224 or 512"):
        load_images([_gradient(64, 48)], size=size)  # type: ignore[arg-type]


def test_bad_in_memory_array() -> None:
    with pytest.raises(InputError, match="HxWx3 uint8"):
        load_images([np.zeros((32, 32), np.uint8)])
    with pytest.raises(InputError, match="HxWx3 uint8"):
        load_images([np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(InputError, match="expected a file path"):
        load_images([42])


def test_empty_list() -> None:
    with pytest.raises(InputError, match="no images"):
        load_images([])
