"""Input conversion and refusals, without a server."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bundle.manifest import InputSpec
from inference.preprocess import (
    Limits,
    decode_base64,
    denormalize,
    image_to_input,
    normalize,
    open_image,
    parse_top_k,
    picture_to_input,
    picture_to_pixels,
    plain_png,
    plain_png_levels,
    tensor_to_batch,
    to_batch,
    to_input,
)
from protoserve.errors import InputError

MNIST = InputSpec(channels=1, height=28, width=28, mean=[0.0], std=[1.0])
NORMALISED = InputSpec(channels=1, height=28, width=28, mean=[0.1307], std=[0.3081])
RGB = InputSpec(channels=3, height=4, width=4, value_range=(0.0, 255.0), mean=[0, 0, 0], std=[255, 255, 255])


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def digit(value: int = 200) -> Image.Image:
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[5:20, 12:15] = value
    return Image.fromarray(pixels, mode="L")


def refused(reason: str, fn, *args):
    with pytest.raises(InputError) as e:
        fn(*args)
    assert e.value.reason == reason, str(e.value)
    return str(e.value)


def test_png_becomes_the_models_input():
    x = to_input(encode(digit(255)), MNIST)
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    assert x[0, 10, 13] == 1.0 and x[0, 0, 0] == 0.0


def test_base64_and_data_url_give_the_same_input():
    data = encode(digit())
    plain = to_input(base64.b64encode(data).decode(), MNIST)
    url = to_input("data:image/png;base64," + base64.b64encode(data).decode(), MNIST)
    np.testing.assert_array_equal(plain, url)


def test_jpeg_rgb_and_other_sizes_are_converted_to_the_spec():
    img = digit(255).convert("RGB").resize((56, 56), Image.Resampling.NEAREST)
    x = to_input(encode(img, "JPEG"), MNIST)
    assert x.shape == (1, 28, 28)
    assert x[0, 10, 13] > 0.8 and abs(x[0, 0, 0]) < 0.05


def test_transparent_pixels_become_black():
    rgba = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    rgba.putpixel((3, 3), (255, 255, 255, 255))
    x = to_input(encode(rgba), MNIST)
    assert x[0, 3, 3] == 1.0 and x[0, 0, 0] == 0.0


def test_normalisation_follows_the_manifest_and_inverts():
    x = to_input(encode(digit(255)), NORMALISED)
    assert x[0, 0, 0] == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    pixels = denormalize(x, NORMALISED)
    assert pixels[0, 10, 13] == pytest.approx(1.0, abs=1e-6) and pixels[0, 0, 0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("spec", [MNIST, NORMALISED, RGB])
def test_level_table_gives_the_numbers_of_the_per_pixel_steps(spec):
    """The lookup equals scaling and normalize done on every pixel in float32, bit for bit."""
    rng = np.random.default_rng(0)
    shape = (spec.height, spec.width) if spec.channels == 1 else (spec.height, spec.width, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    low, high = spec.value_range
    stepwise = normalize(picture_to_pixels(img, spec) * (high - low) + low, spec)
    np.testing.assert_array_equal(picture_to_input(img, spec), stepwise)
    assert picture_to_input(img, spec).dtype == np.float32


@pytest.mark.parametrize("spec", [MNIST, NORMALISED, RGB])
def test_a_tensor_batch_gives_the_numbers_of_the_same_arrays_one_by_one(spec):
    """The Open Inference Protocol's FP32 input: /predict's array checks and numbers, bit for bit."""
    low, high = spec.value_range
    values = (np.random.default_rng(1).random((3, spec.channels, spec.height, spec.width)) * (high - low) + low)
    values = values.astype(np.float32)
    one_by_one = to_batch([v.tolist() for v in values], spec)
    np.testing.assert_array_equal(tensor_to_batch(values, spec), one_by_one)


@pytest.mark.parametrize("values, reason", [
    (np.zeros((1, 1, 28, 27), np.float32), "wrong_shape"), (np.zeros((1, 28, 28), np.float32), "wrong_shape"),
    (np.zeros((0, 1, 28, 28), np.float32), "empty_batch"), (np.zeros((65, 1, 28, 28), np.float32), "batch_too_large"),
    (np.full((1, 1, 28, 28), np.nan, np.float32), "non_finite"),
    (np.full((1, 1, 28, 28), 2, np.float32), "out_of_range"),
])
def test_bad_tensors_are_refused_as_bad_arrays(values, reason):
    refused(reason, tensor_to_batch, values, MNIST)


def test_rgb_spec_with_a_0_255_range():
    x = to_input(encode(Image.new("RGB", (4, 4), (255, 0, 51))), RGB)
    assert x.shape == (3, 4, 4)
    np.testing.assert_allclose(x[:, 0, 0], [1.0, 0.0, 0.2], atol=1e-6)


def test_arrays_hw_and_chw():
    a = np.random.default_rng(0).random((28, 28))
    np.testing.assert_allclose(to_input(a.tolist(), MNIST)[0], a, atol=1e-6)
    np.testing.assert_allclose(to_input([a.tolist()], MNIST)[0], a, atol=1e-6)


@pytest.mark.parametrize("value, reason", [
    ([[0.5] * 27] * 28, "wrong_shape"),
    ([[[0.5] * 28] * 28] * 2, "wrong_shape"),
    ([[0.5] * 28] * 27 + [[0.5] * 5], "wrong_shape"),  # ragged
    ([[0.5] * 28] * 27 + [[float("nan")] * 28], "non_finite"),
    ([[0.5] * 28] * 27 + [[float("inf")] * 28], "non_finite"),
    ([[0.5] * 28] * 27 + [[1.5] * 28], "out_of_range"),
    ([[0.5] * 28] * 27 + [[-0.1] * 28], "out_of_range"),
    ([["a"] * 28] * 28, "wrong_type"),
    ([[True] * 28] * 28, "wrong_type"),
    ({"a": 1}, "wrong_type"),
    (3, "wrong_type"),
    (None, "wrong_type"),
])
def test_bad_arrays_and_types(value, reason):
    refused(reason, to_input, value, MNIST)


def test_not_an_image_and_bad_base64():
    refused("not_an_image", to_input, b"hello, world", MNIST)
    refused("not_an_image", to_input, b"", MNIST)
    refused("not_an_image", to_input, encode(digit(), "GIF"), MNIST)  # only PNG and JPEG
    refused("bad_base64", to_input, "not base64 at all!", MNIST)
    refused("bad_base64", decode_base64, "abc")


def test_truncated_and_damaged_files():
    data = encode(digit())
    refused("corrupt_image", to_input, data[: len(data) // 2], MNIST)
    jpeg = encode(digit().convert("RGB"), "JPEG")
    refused("corrupt_image", to_input, jpeg[:200], MNIST)
    damaged = bytearray(data)
    damaged[40:60] = b"\xff" * 20
    refused("corrupt_image", to_input, bytes(damaged), MNIST)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds one tiny IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 10))
            + png_chunk(b"IEND", b""))


def test_huge_dimensions_are_refused_from_the_header():
    # 100000 x 100000 would be 10 GB decoded; the refusal must come before any decoding.
    message = refused("image_too_large", open_image, png_header_only(100_000, 100_000))
    assert "100000x100000" in message or "decompression" in message
    refused("image_too_large", open_image, png_header_only(5000, 10))  # one side over the limit
    refused("image_too_large", open_image, png_header_only(60, 60), Limits(max_pixels=3000))


def test_a_real_decompression_bomb_is_refused_quickly():
    bomb = encode(Image.new("L", (6000, 6000)))  # 36 Mpixels of zeros: ~35 KB of PNG
    assert len(bomb) < 100_000
    refused("image_too_large", open_image, bomb)


def pil_read(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize("mode", ["L", "RGB", "LA", "RGBA"])
def test_plain_pngs_decode_to_the_pixels_of_pils_reader(mode):
    rng = np.random.default_rng(3)
    bands = len(mode)
    for width, height in ((1, 1), (28, 28), (37, 5), (300, 200)):
        smooth = np.cumsum(rng.integers(0, 9, (height, width, bands)), axis=1) % 256  # every PNG filter gets used
        noisy = rng.integers(0, 256, (height, width, bands))
        for pixels in (smooth, noisy):
            img = Image.fromarray(pixels.astype(np.uint8).squeeze(axis=2) if bands == 1 else pixels.astype(np.uint8),
                                  mode)
            for options in ({}, {"compress_level": 0}, {"optimize": True}):
                buffer = io.BytesIO()
                img.save(buffer, "PNG", **options)
                data = buffer.getvalue()
                fast, reference = plain_png(data), pil_read(data)
                assert fast is not None, (mode, width, height, options)
                assert (fast.mode, fast.size) == (reference.mode, reference.size)
                assert fast.tobytes() == reference.tobytes()
                assert open_image(data).tobytes() == reference.tobytes()
                levels = plain_png_levels(data)  # without alpha: read straight to levels, the same bytes
                if mode in ("L", "RGB"):
                    assert levels.shape == np.asarray(reference).shape and levels.tobytes() == reference.tobytes()
                else:
                    assert levels is None


def test_plain_pngs_with_every_row_filter():
    """Rows filtered None, Sub, Up, Average and Paeth in turn (PNG's five filters), written by hand."""
    rng = np.random.default_rng(5)
    for colour, bands in ((0, 1), (2, 3), (6, 4)):
        width, height = 9, 10
        rows = [bytes([r % 5]) + rng.integers(0, 256, width * bands, dtype=np.uint8).tobytes() for r in range(height)]
        ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
        data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"".join(rows))) + \
            png_chunk(b"IEND", b"")
        assert plain_png(data).tobytes() == pil_read(data).tobytes()
        if colour != 6:
            assert plain_png_levels(data).tobytes() == pil_read(data).tobytes()


def test_pictures_become_the_same_input_with_or_without_an_image_object():
    """image_to_input reads a plain PNG in the spec's mode and size straight to its levels; every other picture
    (another mode, size, alpha, JPEG) goes through PIL's image: the same numbers either way."""
    rng = np.random.default_rng(7)
    grey = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L")
    colour = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB")
    for spec, img, fmt in ((MNIST, grey, "PNG"), (NORMALISED, grey, "PNG"), (RGB, colour, "PNG"),
                           (MNIST, colour.resize((28, 28)), "PNG"), (RGB, grey.resize((4, 4)), "PNG"),
                           (NORMALISED, grey.resize((30, 30)), "PNG"), (RGB, colour.convert("RGBA"), "PNG"),
                           (NORMALISED, grey, "JPEG")):
        data = encode(img, fmt)
        expected = picture_to_input(open_image(data), spec)
        x = image_to_input(data, spec)
        assert x.dtype == expected.dtype and x.shape == expected.shape and np.array_equal(x, expected), (spec, img.mode)
        assert np.array_equal(to_input(base64.b64encode(data).decode(), spec), expected)
    data = encode(grey)
    refused("corrupt_image", image_to_input, data[: len(data) // 2], MNIST)  # truncated: PIL's reader says so
    refused("image_too_large", image_to_input, data, MNIST, Limits(max_image_bytes=len(data) - 1))


def test_other_pngs_are_left_to_pils_reader():
    img = digit()
    buffer = io.BytesIO()
    img.save(buffer, "PNG", dpi=(72, 72))  # a pHYs chunk
    assert plain_png(buffer.getvalue()) is None
    for other in (img.convert("P"), img.convert("I;16"), img.convert("1")):
        assert plain_png(encode(other)) is None
    data = encode(img)
    assert plain_png(data) is not None
    assert plain_png(data[: len(data) // 2]) is None  # truncated: PIL's reader refuses it (above)
    damaged = bytearray(data)
    damaged[-20] ^= 0xFF  # inside the last IDAT: its checksum no longer matches
    assert plain_png(bytes(damaged)) is None
    assert plain_png(png_header_only(60, 60), Limits(max_pixels=3000)) is None
    assert plain_png(png_header_only(28, 28)) is None  # too little image data
    refused("corrupt_image", open_image, png_header_only(28, 28))


def test_oversized_file_and_base64():
    limits = Limits(max_image_bytes=1000)
    refused("image_too_large", open_image, b"\x89PNG" + b"\0" * 2000, limits)
    refused("image_too_large", decode_base64, "A" * 4000, limits)


def test_batches():
    good = [[0.0] * 28] * 28
    assert to_batch([good, good], MNIST).shape == (2, 1, 28, 28)
    refused("missing_field", to_batch, None, MNIST)
    refused("wrong_type", to_batch, "abc", MNIST)
    refused("wrong_type", to_batch, {"x": 1}, MNIST)
    refused("empty_batch", to_batch, [], MNIST)
    refused("batch_too_large", to_batch, [good] * 3, MNIST, Limits(max_batch=2))
    message = refused("wrong_shape", to_batch, [good, [[0.0]]], MNIST)
    assert message.startswith("images[1]:")
    assert refused("wrong_shape", to_batch, [[[0.0]]], MNIST).startswith("images[0]:")
    png, other = encode(digit(255)), encode(digit(90))
    for images in ([png], [good], [png, other], [other, good, png]):  # one image is its own array: the same numbers
        batch = to_batch(images, NORMALISED)
        assert batch.dtype == np.float32 and batch.shape == (len(images), 1, 28, 28) and batch.flags.writeable
        np.testing.assert_array_equal(batch, np.stack([to_input(image, NORMALISED) for image in images]))


def test_top_k():
    assert parse_top_k(None, 15) == 3
    assert parse_top_k(None, 2) == 2
    assert parse_top_k(15, 15) == 15
    refused("top_k_out_of_range", parse_top_k, 0, 15)
    refused("top_k_out_of_range", parse_top_k, 16, 15)
    refused("top_k_out_of_range", parse_top_k, -1, 15)
    refused("wrong_type", parse_top_k, "3", 15)
    refused("wrong_type", parse_top_k, 2.5, 15)
    refused("wrong_type", parse_top_k, True, 15)


def test_unknown_reason_is_a_bug():
    with pytest.raises(ValueError):
        InputError("no_such_reason", "x")
