import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from clipdistill.data.images import BadSample, SkipCounter, check_caption, decode_image, to_rgb


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _noise(width: int = 32, height: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of any size, built without ever holding its pixels: zeros compress ~1000x."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(height // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _reason(source, **kwargs) -> BadSample:
    with pytest.raises(BadSample) as info:
        decode_image(source, **kwargs)
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_path_and_bytes_to_rgb(tmp_path, fmt):
    img = _noise()
    data = _encoded(img, fmt)
    (tmp_path / "x.img").write_bytes(data)
    for source in (tmp_path / "x.img", str(tmp_path / "x.img"), data):
        out = decode_image(source)
        assert out.mode == "RGB" and out.size == (32, 24)
    if fmt == "PNG":  # lossless: the pixels themselves survive
        assert np.array_equal(np.asarray(decode_image(data)), np.asarray(img))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_image_is_bad_and_pil_stays_strict(tmp_path, fmt, keep):
    data = _encoded(_noise(128, 96), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    error = _reason(path)
    assert error.reason == "truncated"
    assert str(path) in str(error) and "drop the sample" in str(error)
    assert _reason(data[: int(len(data) * keep)], name="shard/key").reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_image_cut_in_its_header_is_bad(fmt):
    data = _encoded(_noise(128, 96), fmt)[:100]
    assert _reason(data).reason in ("truncated", "unreadable")  # PIL may no longer recognise the format


def test_empty_missing_and_non_image_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not a picture\n" * 20)
    assert _reason(tmp_path / "empty.jpg").reason == "empty_file"
    assert _reason(b"").reason == "empty_file"
    assert _reason(tmp_path / "notes.jpg").reason == "unreadable"
    assert _reason(b"GIF89a nonsense", name="k1").reason == "unreadable"
    missing = _reason(tmp_path / "nowhere.jpg")
    assert missing.reason == "missing_file" and str(tmp_path / "nowhere.jpg") in str(missing)
    assert _reason(tmp_path).reason == "missing_file"  # a folder is not an image file


def test_cmyk_jpeg_becomes_rgb():
    data = _encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")  # pure red in CMYK
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    red = np.asarray(decode_image(data)).astype(int)
    assert np.abs(red - [255, 0, 0]).max() <= 3


def test_16_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    data = _encoded(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = np.asarray(decode_image(data))
    assert out[0, :, 0].tolist() == [0, 4, 128, 255]  # PIL's convert("RGB") would give 0, 255, 255, 255
    assert (out == out[..., :1]).all()  # grey stays grey


def test_float_image_is_scaled_from_unit_range():
    out = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert np.asarray(out)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_is_composited_on_white(mode):
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (0, 0, 0, 0))  # transparent black -> white
    img.putpixel((1, 0), (0, 0, 0, 255))  # opaque black stays black
    buf = io.BytesIO()
    if mode == "P":  # a palette with one transparent entry (PNG tRNS)
        img = Image.new("P", (2, 1))
        img.putpalette([0, 0, 0, 0, 0, 0])
        img.putpixel((1, 0), 1)
        img.save(buf, "PNG", transparency=0)
    else:
        img.convert(mode).save(buf, "PNG")
    assert Image.open(buf).mode == mode
    out = np.asarray(decode_image(buf.getvalue()))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("mode", ["L", "P", "1"])
def test_other_modes_become_rgb(mode):
    out = decode_image(_encoded(_noise().convert(mode), "PNG"))
    assert out.mode == "RGB" and out.size == (32, 24)


def test_unconvertible_mode_is_bad():
    with pytest.raises(BadSample) as info:
        to_rgb(Image.new("La", (2, 2)), name="odd.png")
    assert info.value.reason == "bad_mode" and "odd.png" in str(info.value)


@pytest.mark.parametrize("side", [10_000, 20_000])  # past our 64M default / past PIL's own bomb limit
def test_huge_image_is_rejected_before_decoding(tmp_path, side):
    path = tmp_path / "huge.png"
    path.write_bytes(_blank_png(side, side))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning leaks out either
        error = _reason(path)
    assert time.perf_counter() - start < 1.0
    assert error.reason == "too_large" and str(path) in str(error)


def test_max_pixels_is_applied():
    data = _encoded(_noise(32, 24), "PNG")
    assert "max_pixels=500" in str(_reason(data, max_pixels=500))
    assert decode_image(data, max_pixels=32 * 24).size == (32, 24)


def test_check_caption():
    assert check_caption("  a dog\n") == "a dog"
    assert check_caption("café".encode()) == "café"
    assert check_caption(1984) == "1984"
    for empty in (None, float("nan"), "", " \t\n", b"  "):
        with pytest.raises(BadSample) as info:
            check_caption(empty)
        assert info.value.reason == "empty_caption"
    with pytest.raises(BadSample) as info:
        check_caption(b"caf\xe9", name="row 7")
    assert info.value.reason == "bad_caption_encoding" and "row 7" in str(info.value)


def test_skip_counter():
    counter = SkipCounter(max_examples=2)
    assert counter.as_dict() == {"total": 0, "by_reason": {}, "examples": []}
    for reason, key in [("truncated", "a"), ("empty_caption", "b"), ("truncated", "c")]:
        counter.add(reason, key)
    assert counter.total == 3
    assert counter.as_dict() == {
        "total": 3,
        "by_reason": {"truncated": 2, "empty_caption": 1},
        "examples": ["a", "b"],
    }


# ---- reduced-size JPEG decode -----------------------------------------------------------------------

# Tolerance of the reduced-size decode against the full one, after the same resize to 224 and centre
# crop, on [0, 1] pixel values: mean absolute difference <= 3/255, 99th percentile <= 24/255 (DCT-domain
# scaling antialiases a little differently from a bicubic filter; detailed photos show it most).
DRAFT_MEAN, DRAFT_P99 = 3 / 255, 24 / 255


def _photo(size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    from sklearn.datasets import load_sample_image

    return _encoded(Image.fromarray(load_sample_image("china.jpg")).resize(size, Image.BICUBIC), fmt)


def _to_224(image: Image.Image) -> np.ndarray:
    from clipdistill.data.sources import pil_transform
    from clipdistill.models.factory import Preprocess

    return pil_transform(Preprocess(224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))(image).numpy()


@pytest.mark.parametrize("size", [(512, 512), (460, 460), (1024, 700), (700, 1024)])
def test_large_jpeg_decodes_at_reduced_size_within_tolerance(size):
    data = _photo(size)
    reduced = decode_image(data, min_side=224)
    assert min(reduced.size) < min(size) and min(reduced.size) >= 224  # decoded at 1/2 or 1/4 scale
    diff = np.abs(_to_224(reduced) - _to_224(decode_image(data)))
    assert diff.mean() <= DRAFT_MEAN and np.quantile(diff, 0.99) <= DRAFT_P99
    assert diff.max() > 0  # a different decode, not the full one


@pytest.mark.parametrize("size, fmt", [((640, 427), "JPEG"), ((512, 512), "PNG"), ((512, 512), "WEBP")])
def test_small_jpegs_and_other_formats_decode_as_before(size, fmt):
    data = _photo(size, fmt)
    assert np.array_equal(np.asarray(decode_image(data, min_side=224)), np.asarray(decode_image(data)))
