"""Images: checked from their header within a decode budget, decoded as 8-bit RGB, downscaled, and staged in a run
folder. Every image a model sees comes through here (`fastjudge.gate` for the commands)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# The most pixels an image may have to be decoded whole: a 16-bit PNG of 13,000 x 13,000 pixels (a 329 KB file)
# took 4.5 GB while being converted and downscaled. A larger JPEG decodes at 1/2, 1/4 or 1/8 of its size (libjpeg
# reduces while decoding: PIL's `draft`); any other larger image is refused from its header, never decoded.
MAX_DECODE_PIXELS = 40_000_000


def _open_within(path: Path | io.BytesIO, max_pixels: int) -> Image.Image:
    """The image at `path` opened (its header read, nothing decoded yet) and, if it is a JPEG over `max_pixels`,
    set to decode at the smallest reduction that brings it within; a ValueError naming the size when it cannot
    be decoded within `max_pixels`."""
    with warnings.catch_warnings():  # PIL warns of a "decompression bomb" from 89 M pixels: ours refuses earlier
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    width, height = im.size
    if width * height > max_pixels and im.format == "JPEG":
        for scale in (2, 4, 8):
            if (width // scale) * (height // scale) <= max_pixels:
                im.draft("RGB", (width // scale, height // scale))
                im.info["reduced_from"] = (width, height)  # decoded smaller than the file: never linked as it is
                break
    if im.size[0] * im.size[1] > max_pixels:
        im.close()
        raise ValueError(f"{width} x {height} pixels, more than the {max_pixels} an image may have to be decoded")
    return im


def check_image(path: Path, max_pixels: int = MAX_DECODE_PIXELS) -> str | None:
    """None when the image opens and decodes within `max_pixels`, else the reason it does not."""
    if not path.is_file():
        return f"image not found: {path}"
    try:
        with _open_within(path, max_pixels) as im:
            im.load()
    except ValueError as exc:
        return f"image too large: {path} ({exc})"
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"image unreadable: {path} ({type(exc).__name__}: {exc})"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL image: grayscale, bilevel, CMYK and palette images converted; transparency
    (RGBA, LA, palette with a transparent colour) composited over white; 16- and 32-bit integer grayscale scaled
    down to 8 bits (PIL's own conversion clips them: a 16-bit image would come out nearly white); float
    grayscale clipped to [0, 255]."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image)  # (H, W) uint16 or int32, as stored
        top = 65535 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else int(values.max())
        gray = np.empty(values.shape, dtype=np.uint8)
        for row in range(0, values.shape[0], 256):  # in bands: float64 of the whole image would be 8 bytes a pixel
            band = values[row:row + 256].astype(np.float64)
            gray[row:row + 256] = np.clip(band * 255.0 / max(top, 1) + 0.5, 0, 255)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """`image` downscaled (Lanczos, aspect ratio kept) to at most `max_pixels` pixels; unchanged when it fits."""
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = (max_pixels / (width * height)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    while size[0] * size[1] > max_pixels:  # rounding may leave a few pixels too many
        size = (max(1, size[0] - 1), size[1]) if size[0] >= size[1] else (size[0], max(1, size[1] - 1))
    return image.resize(size, Image.LANCZOS)


def encode_image(image: Image.Image) -> str:
    """A PIL image as base64 PNG, as a `fastjudge serve` request carries it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_image_bytes(data: bytes, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """An image's bytes (a request's, a parquet row's) decoded within `max_pixels` as 8-bit RGB (`load_image`)."""
    return load_image(io.BytesIO(data), max_pixels)


def load_image(path: str | Path, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """The image at `path`, decoded within `max_pixels` (a larger JPEG at a reduced scale), as 8-bit RGB
    (`to_rgb`)."""
    with _open_within(path if isinstance(path, io.BytesIO) else Path(path), max_pixels) as im:
        im.load()
        rgb = to_rgb(im)
        return im.copy() if rgb is im else rgb  # the file closes here: nothing may read it lazily later


def stage_image(source: Path, folder: Path, max_pixels: int) -> tuple[Path, str]:
    """A run's own copy of an input image under `folder` (its bytes' sha256 as the name), so that the run folder
    holds every image it uses and can be moved: RGB within `max_pixels` pixels is hard-linked (copied across
    file systems); any other image is written as an RGB PNG, downscaled when over the limit. Returns the path
    and what was done: "linked", "copied", "converted" or "downscaled". A staged image is reused."""
    return _stage(source.read_bytes(), folder, max_pixels, source.suffix.lower(), source)


# the file name suffix of an image kept as it is, by its format (images embedded in parquet have no name)
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


def stage_image_bytes(data: bytes, folder: Path, max_pixels: int) -> tuple[Path, str]:
    """`stage_image` of an image's bytes (embedded in a parquet row): written as they are ("written") when RGB
    within `max_pixels` in PNG, JPEG or WebP, else converted or downscaled. Raises as `Image.open` and the decode
    budget do on bytes that are not an image within it."""
    return _stage(data, folder, max_pixels, None, None)


def _stage(data: bytes, folder: Path, max_pixels: int, suffix: str | None, source: Path | None) -> tuple[Path, str]:
    digest = hashlib.sha256(data).hexdigest()[:32]
    with _open_within(io.BytesIO(data) if source is None else source, MAX_DECODE_PIXELS) as im:
        reduced = "reduced_from" in im.info
        keep = (im.mode == "RGB" and im.width * im.height <= max_pixels and im.format in SUFFIXES and not reduced)
        action = "downscaled" if reduced or im.width * im.height > max_pixels else "converted"
        name = f"{digest}{suffix if suffix is not None else SUFFIXES.get(im.format, '')}"
        target = folder / (name if keep else f"{digest}-{max_pixels}.png")
        if target.exists():
            return target, "reused"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        if keep and source is None:
            im.load()  # the whole image decodes: bytes that only begin like an image are refused here
            tmp.write_bytes(data)
            action = "written"
        elif keep:
            try:
                os.link(source, tmp)
                action = "linked"
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(source, tmp)
                action = "copied"
        else:
            fit_pixels(to_rgb(im), max_pixels).save(tmp, format="PNG")
    os.replace(tmp, target)
    return target, action


def load_images(paths: list[str]) -> list[Image.Image]:
    """One RGB image per path, each distinct file decoded once (pairs and samples share images)."""
    cache: dict[str, Image.Image] = {}
    return [cache[p] if p in cache else cache.setdefault(p, load_image(p)) for p in paths]

