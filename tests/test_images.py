"""dncut.data.images: decoding every image mode we meet, and failing loudly on bad data.

Expected pixels are written by hand or computed with numpy from the input values.
"""

from __future__ import annotations

import glob
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from dncut.data.images import IMAGE_SUFFIXES, ImageDecodeError, decode_image, load_mask
from bench.s3server import make_jpeg

SOD = "/work/shared/data/sod-val"
BSDS = "/work/shared/data/bsds-unlabeled"


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _rgb(data: bytes, **kwargs) -> np.ndarray:
    image = decode_image(data, **kwargs)
    assert image.mode == "RGB"
    return np.asarray(image)  # (H, W, 3)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# ----------------------------------------------------------------------------- failures


def test_suffixes_and_error_type():
    assert ".jpg" in IMAGE_SUFFIXES and ".png" in IMAGE_SUFFIXES
    assert issubclass(ImageDecodeError, ValueError)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_and_empty_bytes_raise():
    junk = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match="not a valid image"):
        decode_image(junk)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError):
        load_mask(junk)


def test_truncated_jpeg_raises():
    data = make_jpeg(seed=3, width=256, height=256)
    assert np.asarray(decode_image(data)).shape == (256, 256, 3)
    for cut in (len(data) // 2, len(data) - 2):
        with pytest.raises(ImageDecodeError, match="truncated"):
            decode_image(data[:cut])


def test_truncated_real_photo_raises():
    files = sorted(glob.glob(f"{BSDS}/*.jpg"))
    if not files:
        pytest.skip("BSDS photos not available")
    data = open(files[0], "rb").read()
    assert decode_image(data).mode == "RGB"
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_zero_size_png_raises():
    header = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)  # width 0, height 5, 8-bit RGB
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_min_size():
    data = _encode(Image.new("RGB", (4, 10), (1, 2, 3)))
    assert decode_image(data, min_size=4).size == (4, 10)
    with pytest.raises(ImageDecodeError, match=r"4x10.*min_size=5"):
        decode_image(data, min_size=5)
    with pytest.raises(ValueError, match="min_size"):
        decode_image(data, min_size=0)


# ----------------------------------------------------------------------------- modes


def test_rgb_is_unchanged_png():
    pixels = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_rgb(_encode(Image.fromarray(pixels))), pixels)


def test_grayscale_and_one_bit():
    gray = np.array([[0, 17, 128], [200, 254, 255]], dtype=np.uint8)
    out = _rgb(_encode(Image.fromarray(gray, mode="L")))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    bits = Image.fromarray(np.array([[True, False]])).convert("1")
    np.testing.assert_array_equal(_rgb(_encode(bits)), [[[255, 255, 255], [0, 0, 0]]])


def test_rgba_composited_on_black():
    rgba = np.array([[[200, 100, 50, 128], [10, 20, 30, 0], [9, 99, 199, 255]]], dtype=np.uint8)
    out = _rgb(_encode(Image.fromarray(rgba, mode="RGBA")))
    # by hand: round(200*128/255)=100, round(100*128/255)=50, round(50*128/255)=25
    np.testing.assert_array_equal(out, [[[100, 50, 25], [0, 0, 0], [9, 99, 199]]])


def test_la_composited_on_black():
    la = np.array([[[200, 128], [77, 255]]], dtype=np.uint8)
    out = _rgb(_encode(Image.fromarray(la, mode="LA")))
    np.testing.assert_array_equal(out, [[[100] * 3, [77] * 3]])


def test_palette_with_transparency():
    image = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), mode="P")
    image.putpalette([10, 20, 30, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    data = _encode(image, transparency=2)  # index 2 (green) fully transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    np.testing.assert_array_equal(_rgb(data), [[[10, 20, 30], [255, 0, 0], [0, 0, 0]]])
    plain = _encode(image)  # no transparency: palette colours as they are
    np.testing.assert_array_equal(_rgb(plain), [[[10, 20, 30], [255, 0, 0], [0, 255, 0]]])


def test_cmyk_tiff_and_jpeg():
    cmyk = Image.new("CMYK", (3, 1))
    for x, value in enumerate([(0, 255, 255, 0), (0, 0, 0, 128), (0, 0, 0, 0)]):
        cmyk.putpixel((x, 0), value)
    # by hand: channel = (255 - C) * (255 - K) / 255
    np.testing.assert_allclose(_rgb(_encode(cmyk, "TIFF")), [[[255, 0, 0], [127] * 3, [255] * 3]], atol=1)
    jpeg = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(jpeg)).mode == "CMYK"
    np.testing.assert_allclose(_rgb(jpeg)[8, 8], [255, 0, 0], atol=6)


def test_sixteen_bit_png_scaled_to_eight_bit():
    values = np.array([[0, 1000, 257 * 100, 128 * 257, 60000, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    expected = np.array([0, 4, 100, 128, 233, 255])  # round(v / 257), by hand
    np.testing.assert_array_equal(_rgb(data)[0], np.stack([expected] * 3, axis=1))


def test_thirty_two_bit_tiff():
    in_range = np.array([[0, 2570, 65535]], dtype=np.int32)
    np.testing.assert_array_equal(_rgb(_encode(Image.fromarray(in_range), "TIFF"))[0, :, 0], [0, 10, 255])
    wide = np.array([[-100, 0, 300]], dtype=np.int32)  # outside 16 bit: min-max, 100*255/400=63.75
    np.testing.assert_array_equal(_rgb(_encode(Image.fromarray(wide), "TIFF"))[0, :, 0], [0, 64, 255])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_applied(fmt):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: left -> top
    out = _rgb(_encode(image, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {})))
    assert out.shape == (40, 20, 3)
    np.testing.assert_allclose(out[:18].reshape(-1, 3).mean(0), [255, 0, 0], atol=3)
    np.testing.assert_allclose(out[22:].reshape(-1, 3).mean(0), [0, 0, 255], atol=3)


# ----------------------------------------------------------------------------- masks


def test_mask_gray_threshold_is_strictly_above_half():
    gray = np.array([[0, 127, 128, 255]], dtype=np.uint8)  # 127/255 < 0.5 < 128/255
    mask = load_mask(_encode(Image.fromarray(gray, mode="L")))
    assert mask.dtype == bool and mask.shape == (1, 4)
    np.testing.assert_array_equal(mask, [[False, False, True, True]])


def test_mask_one_bit_rgb_palette_sixteen_bit():
    bits = Image.fromarray(np.array([[True, False, True]])).convert("1")
    np.testing.assert_array_equal(load_mask(_encode(bits)), [[True, False, True]])
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [200, 200, 200]]], dtype=np.uint8)
    np.testing.assert_array_equal(load_mask(_encode(Image.fromarray(rgb))), [[True, False, True]])
    palette = Image.fromarray(np.array([[0, 1, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * (254 * 3))
    np.testing.assert_array_equal(load_mask(_encode(palette)), [[False, True, True]])
    wide = np.array([[0, 32767, 32768, 65535]], dtype=np.uint16)  # 32767/65535 < 0.5 < 32768/65535
    np.testing.assert_array_equal(load_mask(_encode(Image.fromarray(wide))), [[False, False, True, True]])
    floats = np.array([[0.0, 0.49, 0.5, 0.51]], dtype=np.float32)  # exactly 0.5 is background
    np.testing.assert_array_equal(load_mask(_encode(Image.fromarray(floats), "TIFF")), [[False, False, False, True]])


def test_real_sod_images_and_masks():
    images = sorted(glob.glob(f"{SOD}/images/*.jpg"))[:15]
    if not images:
        pytest.skip("sod-val not available")
    for path in images:
        stem = path.rsplit("/", 1)[1][:-4]
        image = decode_image(open(path, "rb").read(), min_size=16)
        mask = load_mask(open(f"{SOD}/masks/{stem}.png", "rb").read())
        assert mask.shape == (image.height, image.width)
        assert 0 < mask.mean() < 1


# ----------------------------------------------------------------------------- mask encodings (the peers' layouts)


def _forty_by_sixty() -> np.ndarray:
    """(40, 60) bool with 600 foreground pixels (a 20 x 30 block)."""
    fg = np.zeros((40, 60), bool)
    fg[10:30, 15:45] = True
    assert fg.sum() == 600
    return fg


def test_class_colour_masks_read_as_their_foreground():
    """VOC / DAVIS label 1 is (128, 0, 0): stored as RGB and as a palette PNG, 600 pixels each."""
    fg = _forty_by_sixty()
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[fg] = (128, 0, 0)
    palette = Image.fromarray(fg.astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * (254 * 3))
    for encoded in (_encode(Image.fromarray(rgb)), _encode(palette)):
        mask = load_mask(encoded)
        assert mask.sum() == 600 and np.array_equal(mask, fg)


def test_label_grey_sixteen_bit_and_void_encodings():
    fg = _forty_by_sixty()
    labels = fg.astype(np.uint8)  # a 0/1 label PNG
    assert np.array_equal(load_mask(_encode(Image.fromarray(labels, mode="L"))), fg)
    classes = (fg * 15).astype(np.uint8)  # class id 15 (VOC "person") as a grey label image
    assert np.array_equal(load_mask(_encode(Image.fromarray(classes, mode="L"))), fg)
    grey = (fg * 255).astype(np.uint8)
    assert np.array_equal(load_mask(_encode(Image.fromarray(grey, mode="L"))), fg)
    wide = (fg * 65535).astype(np.uint16)
    assert np.array_equal(load_mask(_encode(Image.fromarray(wide))), fg)
    wide_labels = fg.astype(np.uint16)  # 16-bit 0/1 labels
    assert np.array_equal(load_mask(_encode(Image.fromarray(wide_labels))), fg)
    voc = np.zeros((40, 60, 3), np.uint8)
    voc[fg] = (192, 128, 128)  # VOC person
    voc[9, :] = (224, 224, 192)  # void boundary: background
    assert np.array_equal(load_mask(_encode(Image.fromarray(voc))), fg)


def test_grey_mask_saved_as_rgb_jpeg_stays_grey():
    """A 0/255 mask through JPEG as RGB: chroma noise must not turn near-black into foreground."""
    fg = _forty_by_sixty()
    grey = np.repeat((fg * 255).astype(np.uint8)[..., None], 3, axis=2)
    mask = load_mask(_encode(Image.fromarray(grey), "JPEG"))
    assert abs(int(mask.sum()) - 600) <= 40 and mask[15:25, 20:40].all() and not mask[:5].any()


def test_empty_mask_is_flagged_not_scored():
    from dncut.data.images import check_mask_foreground

    empty = load_mask(_encode(Image.fromarray(np.zeros((40, 60), np.uint8), mode="L")))
    assert not empty.any()
    with pytest.raises(ValueError, match="no foreground pixel"):
        check_mask_foreground(empty)
