"""Turn what a client sends (PNG/JPEG bytes, base64 text, nested numeric arrays) into the model's input.

The model's input is what the bundle's manifest says (`InputSpec`): `channels` x `height` x
`width`, pixel values scaled into `value_range`, then `(x - mean) / std` per channel. Pictures are
converted to the spec's mode and size; arrays must already have the spec's shape and range. Anything
else is refused with an InputError naming the problem, before any pixel is decoded where possible.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin

from bundle.manifest import InputSpec
from inference.canonical import canonicalize
from protoserve.errors import InputError

# How PNG and JPEG files begin, and PIL's reader for each: chosen here from the first bytes, instead of
# Image.open trying its registered formats in turn (the same reader, less work for a small picture).
READERS = ((b"\x89PNG\r\n\x1a\n", PngImagePlugin.PngImageFile), (b"\xff\xd8\xff", JpegImagePlugin.JpegImageFile))


@dataclass(frozen=True)
class Limits:
    """What one request may hold; the defaults suit 28x28 digits with a wide margin."""

    max_batch: int = 64
    max_image_bytes: int = 4 * 1024 * 1024
    max_side: int = 4096  # pixels along either axis, checked from the header before decoding
    max_pixels: int = 4096 * 4096


DEFAULT_LIMITS = Limits()


def decode_base64(text: str, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Base64 text (optionally a data: URL) -> bytes."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > limits.max_image_bytes * 4 // 3 + 4:
        raise InputError("image_too_large", f"base64 image of {len(text)} characters is over the "
                         f"{limits.max_image_bytes} byte limit")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("bad_base64", "image string is not valid base64") from None


def open_image(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """PNG/JPEG bytes -> a decoded picture; refuses other formats, damage and oversized dimensions."""
    if len(data) == 0:
        raise InputError("not_an_image", "image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise InputError("image_too_large", f"image of {len(data)} bytes is over the "
                         f"{limits.max_image_bytes} byte limit")
    img = plain_png(data, limits)
    if img is not None:
        return img
    reader = next((reader for signature, reader in READERS if data.startswith(signature)), None)
    if reader is None:
        raise InputError("not_an_image", "not a PNG or JPEG image")
    try:
        img = reader(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, IndexError, TypeError, struct.error) as e:
        raise InputError("corrupt_image", f"image header is damaged ({e})") from None
    width, height = img.size
    # Only the header has been read so far: refuse big pictures before their pixels are decoded.
    max_pixels = pixel_limit(limits)
    if width > limits.max_side or height > limits.max_side or width * height > max_pixels:
        raise InputError("image_too_large", f"image is {width}x{height} pixels; the limit is "
                         f"{limits.max_side} per side and {max_pixels} in all")
    if width == 0 or height == 0:
        raise InputError("corrupt_image", f"image is {width}x{height} pixels")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError("corrupt_image", f"image is truncated or damaged ({e})") from None
    return img


def pixel_limit(limits: Limits) -> int:
    """The most pixels a picture may have: the limits', and PIL's own decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS) should the limits be wider."""
    return min(limits.max_pixels, Image.MAX_IMAGE_PIXELS or limits.max_pixels)


PLAIN_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}  # 8-bit PNG colour types -> PIL mode (and raw mode)


def plain_png(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Image.Image | None:
    """A plain PNG (8-bit grey/RGB with or without alpha, not interlaced, within the limits, every chunk's
    checksum right, no chunk but IHDR, IDAT and IEND), decoded by PIL's own PNG decoder without PIL's
    chunk-by-chunk reader; None for anything else, which open_image gives to PIL's reader (and its
    refusals). The same pixels as PIL's reader, at a fraction of the Python work for a small picture."""
    found = plain_png_data(data, limits)
    if found is None:
        return None
    mode, size, idat = found
    try:
        return Image.frombytes(mode, size, idat, "zip", mode)
    except (ValueError, OSError):  # short or damaged image data: PIL's reader says what is wrong
        return None


def plain_png_levels(data: bytes, limits: Limits = DEFAULT_LIMITS) -> np.ndarray | None:
    """A plain PNG without alpha (plain_png's, grey or RGB) as its 8-bit levels, uint8 [H, W] or [H, W, 3]: the
    bytes of plain_png(data).tobytes() by the same decoder, without building a PIL image; None for any other
    file or data the decoder refuses."""
    found = plain_png_data(data, limits)
    if found is None or found[0] not in ("L", "RGB"):
        return None
    mode, (width, height), idat = found
    try:
        levels = zip_decode(mode, (width, height), idat)
    except (AttributeError, TypeError):  # a Pillow whose core calls differ: PIL's reader takes the picture
        return None
    if levels is None:
        return None
    levels = np.frombuffer(levels, dtype=np.uint8)
    return levels.reshape(height, width) if mode == "L" else levels.reshape(height, width, 3)


def plain_png_data(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[str, tuple[int, int], bytes] | None:
    """A plain PNG's (see plain_png) PIL mode, size and compressed image data (its IDAT chunks joined); None
    for any other file."""
    pos, end, header, idat = 8, len(data), None, []
    if not data.startswith(READERS[0][0]):
        return None
    while True:
        if pos + 12 > end:
            return None
        length, kind = struct.unpack_from(">I4s", data, pos)
        stop = pos + 8 + length
        if stop + 4 > end or zlib.crc32(data[pos + 4:stop]) != int.from_bytes(data[stop:stop + 4], "big"):
            return None
        if header is None:
            if kind != b"IHDR" or length != 13:
                return None
            header = struct.unpack_from(">IIBBBBB", data, pos + 8)
        elif kind == b"IDAT":
            idat.append(data[pos + 8:stop])
        elif kind == b"IEND" and length == 0:
            break
        else:
            return None
        pos = stop + 4
    width, height, depth, colour, compression, filtering, interlace = header
    if (depth != 8 or colour not in PLAIN_PNG_MODES or compression or filtering or interlace or not idat
            or not 0 < width <= limits.max_side or not 0 < height <= limits.max_side
            or width * height > pixel_limit(limits)):
        return None
    return PLAIN_PNG_MODES[colour], (width, height), b"".join(idat)


def zip_decode(mode: str, size: tuple[int, int], idat: bytes) -> bytes | None:
    """PNG image data (zlib, filtered rows) -> the pixels' raw bytes in `mode`, or None when they are short or
    damaged. The C calls of Image.frombytes(mode, size, idat, "zip", mode).tobytes() (PIL's core: its zip
    decoder into a blank image, its raw encoder out of it) without the Python of building an Image, which
    for a small picture costs more than the decoding; tests/inference/test_preprocess.py holds it to that."""
    im = Image.core.fill(mode, size, 0)
    decoder = Image.core.zip_decoder(mode, mode)
    decoder.setimage(im, (0, 0, *size))
    consumed, error = decoder.decode(idat)
    if consumed >= 0 or error != 0:  # Image.frombytes: "not enough image data" / "cannot decode image data"
        return None
    encoder = Image.core.raw_encoder(mode, mode)
    try:
        encoder.setimage(im, (0, 0, *size))
        chunks = []
        while True:
            _, done, chunk = encoder.encode(max(65536, size[0] * 4))  # tobytes' buffer size
            chunks.append(chunk)
            if done:
                break
    finally:
        encoder.cleanup()
    return b"".join(chunks) if done > 0 else None


def picture_to_pixels(img: Image.Image, spec: InputSpec, canonical: bool = False) -> np.ndarray:
    """A picture -> float32 [C, H, W] in [0, 1]: the spec's mode (L or RGB) and size; with `canonical`,
    made the way the training images were (spec.canonical, from the picture at its own size)."""
    img = picture_in_mode(img, spec)
    if canonical:
        grey = np.asarray(img, dtype=np.float32) / 255.0
        return canonicalize(grey, spec.canonical, spec.height, spec.width)[None]
    pixels = np.asarray(fit_size(img, spec), dtype=np.float32) / 255.0
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def fit_size(img: Image.Image, spec: InputSpec) -> Image.Image:
    """A picture at the spec's height x width (bilinear)."""
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return img


def picture_in_mode(img: Image.Image, spec: InputSpec) -> Image.Image:
    """A picture in the spec's mode: 8-bit L or RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: to 8 bits first, as convert("L") would clip it.
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the background of the digits the models know.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    mode = "L" if spec.channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    return img


def normalize(values: np.ndarray, spec: InputSpec) -> np.ndarray:
    """[C, H, W] in value_range -> the model's input: (x - mean) / std per channel, float32."""
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return ((values.astype(np.float32) - mean) / std).astype(np.float32)


def denormalize(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The model's input space [C, H, W] -> pixels in [0, 1] (the inverse of scaling and normalize)."""
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    low, high = spec.value_range
    return ((x * std + mean - low) / (high - low)).clip(0.0, 1.0)


def picture_to_input(img: Image.Image, spec: InputSpec, canonical: bool = False) -> np.ndarray:
    """A picture -> the model's input [C, H, W]: each 8-bit level looked up in `level_table`, or with
    `canonical` the canonical form's pixels scaled and normalised."""
    if canonical:
        low, high = spec.value_range
        return normalize(picture_to_pixels(img, spec, canonical) * (high - low) + low, spec)
    return levels_to_input(picture_levels(fit_size(picture_in_mode(img, spec), spec)), spec)


def levels_to_input(levels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A picture's 8-bit levels in the spec's mode and size, uint8 [H, W] (L) or [H, W, 3] (RGB) -> the model's
    input [C, H, W], each level looked up in `level_table`."""
    table = level_table(spec.channels, tuple(spec.value_range), tuple(spec.mean), tuple(spec.std))
    if levels.ndim == 2:
        return table[0][levels][None]
    return np.stack([table[c][levels[..., c]] for c in range(spec.channels)])


def picture_levels(img: Image.Image) -> np.ndarray:
    """An 8-bit L or RGB picture's levels, uint8 [H, W] or [H, W, 3] (np.asarray's array, built directly)."""
    levels = np.frombuffer(img.tobytes(), dtype=np.uint8)
    return levels.reshape(img.height, img.width) if img.mode == "L" else levels.reshape(img.height, img.width, 3)


@functools.lru_cache(maxsize=16)
def level_table(channels: int, value_range: tuple, mean: tuple, std: tuple) -> np.ndarray:
    """float32 [C, 256]: the model input for each 8-bit level of each channel, by the float32 steps of
    picture_to_pixels, scaling to the value range and normalize (so a lookup gives the same numbers
    as those steps on every pixel, at a fraction of the cost)."""
    low, high = value_range
    levels = np.arange(256, dtype=np.float32) / 255.0
    scaled = np.broadcast_to(levels * (high - low) + low, (channels, 1, 256))
    mean = np.asarray(mean, dtype=np.float32)[:, None, None]
    std = np.asarray(std, dtype=np.float32)[:, None, None]
    return ((scaled.astype(np.float32) - mean) / std).astype(np.float32)[:, 0, :]


def check_canonical(canonical: bool, spec: InputSpec) -> None:
    """Refuse "canonicalize" for a model whose input spec does not say how its images were made."""
    if canonical and (spec.canonical is None or spec.channels != 1):
        raise InputError("no_canonical_form", '"canonicalize" is not available: this model\'s input spec has no '
                         "canonical form (see /metadata input.canonical)")


def canonical_input(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Model input [1, H, W] -> the same image made the way the training images were."""
    low, high = spec.value_range
    pixels = canonicalize(denormalize(x, spec)[0], spec.canonical, spec.height, spec.width)
    return normalize(pixels[None] * (high - low) + low, spec)


def array_to_input(value: list, spec: InputSpec) -> np.ndarray:
    """A nested numeric list [H][W] (one channel) or [C][H][W], values in value_range -> model input."""
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError):
        raise InputError("wrong_shape", "array is ragged: rows of different lengths") from None
    if raw.dtype == object:
        raise InputError("wrong_shape", "array is ragged or mixes numbers with lists")
    if raw.size and raw.dtype.kind not in "iuf":
        raise InputError("wrong_type", f"array holds {raw.dtype.kind!r} values; expected numbers")
    expected = (spec.channels, spec.height, spec.width)
    if raw.ndim == 2 and spec.channels == 1:
        raw = raw[None]
    if raw.shape != expected:
        want = f"[{spec.height}][{spec.width}] or " if spec.channels == 1 else ""
        raise InputError("wrong_shape", f"array has shape {list(raw.shape)}; expected {want}"
                         f"[{spec.channels}][{spec.height}][{spec.width}]")
    values = raw.astype(np.float64)
    check_values(values, spec, "array")
    return normalize(values, spec)


def check_values(values: np.ndarray, spec: InputSpec, what: str) -> None:
    """Finite, and within the model's value range (to a millionth of it): else an InputError naming it."""
    if not np.isfinite(values).all():
        raise InputError("non_finite", f"{what} holds NaN or infinity")
    low, high = spec.value_range
    tolerance = 1e-6 * (high - low)
    if values.min() < low - tolerance or values.max() > high + tolerance:
        raise InputError("out_of_range", f"{what} values span [{values.min():g}, {values.max():g}]; "
                         f"the model takes [{low:g}, {high:g}]")


def image_to_input(data: bytes, spec: InputSpec, limits: Limits = DEFAULT_LIMITS,
                   canonical: bool = False) -> np.ndarray:
    """PNG/JPEG bytes -> the model's input [C, H, W]: picture_to_input(open_image(data)), with a plain PNG already
    in the spec's mode (grey for one channel, else RGB) and size read straight to its levels (the same numbers)."""
    if not canonical and len(data) <= limits.max_image_bytes:
        levels = plain_png_levels(data, limits)
        if (levels is not None and levels.shape[:2] == (spec.height, spec.width)
                and (levels.ndim == 2) == (spec.channels == 1)):
            return levels_to_input(levels, spec)
    return picture_to_input(open_image(data, limits), spec, canonical)


def to_input(value: object, spec: InputSpec, limits: Limits = DEFAULT_LIMITS, canonical: bool = False) -> np.ndarray:
    """One IMAGE as the API takes it (base64 string, raw bytes or nested list) -> float32 [C, H, W];
    `canonical` (the request option "canonicalize") makes it the way the training images were made."""
    check_canonical(canonical, spec)
    if isinstance(value, (bytes, bytearray)):
        return image_to_input(bytes(value), spec, limits, canonical)
    if isinstance(value, str):
        return image_to_input(decode_base64(value, limits), spec, limits, canonical)
    if isinstance(value, list):
        x = array_to_input(value, spec)
        return canonical_input(x, spec) if canonical else x
    raise InputError("wrong_type", f"an image must be a base64 PNG/JPEG string or a numeric array, "
                     f"not {_json_type(value)}")


def to_batch(images: object, spec: InputSpec, limits: Limits = DEFAULT_LIMITS, canonical: bool = False) -> np.ndarray:
    """The "images" field of /predict -> float32 [N, C, H, W]; the first bad image names its index."""
    if images is None:
        raise InputError("missing_field", 'body needs "images": a list of images')
    if not isinstance(images, list):
        raise InputError("wrong_type", f'"images" must be a list of images, not {_json_type(images)}')
    if not images:
        raise InputError("empty_batch", '"images" is empty')
    if len(images) > limits.max_batch:
        raise InputError("batch_too_large", f'"images" holds {len(images)} images; at most {limits.max_batch} '
                         "per request")
    check_canonical(canonical, spec)
    shape = (spec.channels, spec.height, spec.width)
    if len(images) == 1:
        x = _numbered(0, images[0], spec, limits, canonical)
        if x.dtype == np.float32 and x.shape == shape:  # one image (most calls): its own array, not a copy
            return x[None]
    batch = np.empty((len(images), *shape), dtype=np.float32)
    for i, image in enumerate(images):
        batch[i] = x if len(images) == 1 else _numbered(i, image, spec, limits, canonical)
    return batch


def _numbered(i: int, image: object, spec: InputSpec, limits: Limits, canonical: bool) -> np.ndarray:
    """to_input, its refusal naming the image's index."""
    try:
        return to_input(image, spec, limits, canonical)
    except InputError as e:
        raise InputError(e.reason, f"images[{i}]: {e}", e.status) from None


def tensor_to_batch(values: np.ndarray, spec: InputSpec, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A numeric [N, C, H, W] tensor, values in value_range (an Open Inference Protocol FP32 input) -> the model
    input [N, C, H, W]: the checks and scaling of array_to_input, on the whole batch at once."""
    expected = (spec.channels, spec.height, spec.width)
    if values.ndim != 4 or values.shape[1:] != expected:
        raise InputError("wrong_shape", f"tensor has shape {list(values.shape)}; expected [N, {spec.channels}, "
                         f"{spec.height}, {spec.width}]")
    if len(values) == 0:
        raise InputError("empty_batch", "tensor holds no images (N = 0)")
    if len(values) > limits.max_batch:
        raise InputError("batch_too_large", f"tensor holds {len(values)} images; at most {limits.max_batch} "
                         "per request")
    check_values(values, spec, "tensor")
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    return ((values.astype(np.float32) - mean) / std).astype(np.float32)


def parse_top_k(value: object, n_prototypes: int) -> int:
    if value is None:
        return 3 if n_prototypes >= 3 else n_prototypes
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError("wrong_type", f'"top_k" must be an integer, not {_json_type(value)}')
    if not 1 <= value <= n_prototypes:
        raise InputError("top_k_out_of_range", f'"top_k" is {value}; it must be between 1 and {n_prototypes}')
    return value


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
