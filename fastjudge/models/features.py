"""The vision feature cache: each image encoded once per set of vision weights.

With the vision tower frozen, each image is encoded once and reused by synth, filter, train and eval alike, and by
the n samples of one prompt. What is cached is what the language model consumes: Mllama's projected
cross-attention states, Qwen's merged patch embeddings. The run owns the cache (`FeatureCache`) and hands it to
each adapter it loads, so the base model and every judge after it share the entries of a frozen vision tower.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

# images per vision-tower forward on a cache miss: 16 on a GPU; one on the CPU, where a matrix product's last bits
# depend on how many rows it has, so that an image's features do not depend on which other images missed the
# cache with it (a resumed run, whose cache starts cold, then reproduces an uninterrupted one exactly)
VISION_BATCH = 16
VISION_BATCH_CPU = 1
DEFAULT_CACHE_BYTES = 16 << 30  # an adapter's own cache when the caller hands it none


def chunks(count: int, size: int):
    """(start, stop) spans of at most `size` over range(count)."""
    for start in range(0, count, size):
        yield start, min(count, start + size)


@dataclass
class ImageFeatures:
    """One image as the language model consumes it. Mllama: (tiles * patches, hidden) cross-attention states;
    Qwen: (image tokens, hidden) merged patch embeddings. `info`: Mllama (valid tiles,), Qwen grid (t, h, w)."""
    features: torch.Tensor
    info: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


class FeatureCache:
    """Least-recently-used map (image hash, vision fingerprint) -> ImageFeatures (kept on the CPU), bounded in
    bytes; `stats` counts hits, misses (= images encoded) and evictions."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], ImageFeatures] = OrderedDict()
        self._bytes = 0
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}

    def get(self, key: tuple[str, str]) -> ImageFeatures | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats["misses"] += 1
            return None
        self._entries.move_to_end(key)
        self.stats["hits"] += 1
        return entry

    def put(self, key: tuple[str, str], entry: ImageFeatures) -> None:
        if entry.nbytes > self.max_bytes:
            return
        if key in self._entries:
            self._bytes -= self._entries.pop(key).nbytes
        self._entries[key] = entry
        self._bytes += entry.nbytes
        self._evict()

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self.stats["evictions"] += 1

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo) -> "FeatureCache":
        # a cache is shared, never copied: a copied adapter (the judge made from the base) reads the same entries
        return self


_IMAGE_HASHES: dict[int, str] = {}  # id(image) -> hash, dropped when the image is collected


def image_hash(image: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels (not its file name), memoized per image object. Modes whose
    bytes are not colours (palette "P": indices) are hashed as RGB."""
    digest = _IMAGE_HASHES.get(id(image))
    if digest is None:
        pixels = image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")
        h = hashlib.sha256(f"{pixels.mode}:{pixels.size}:".encode())
        h.update(pixels.tobytes())
        digest = _IMAGE_HASHES[id(image)] = h.hexdigest()
        weakref.finalize(image, _IMAGE_HASHES.pop, id(image), None)
    return digest


def vision_fingerprint(adapter) -> str:
    """sha256 over the image preprocessing and the vision tower's parameter names and bytes; computed once
    per set of weights."""
    if adapter._vision_fingerprint is None:
        h = hashlib.sha256(type(adapter.model).__name__.encode())
        h.update(adapter.preprocessing().encode())
        for name, p in adapter.model.named_parameters():
            if adapter.is_vision(name):
                h.update(name.encode())
                h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        adapter._vision_fingerprint = h.hexdigest()
    return adapter._vision_fingerprint



def image_features(adapter, images: list[Image.Image]) -> list[ImageFeatures]:
    """Features of each image: from the cache when the vision tower is frozen (misses encoded in batches of
    VISION_BATCH, VISION_BATCH_CPU on the CPU), computed with gradients when it trains."""
    if adapter.vision_trains() or adapter.feature_cache is None or adapter.feature_cache.max_bytes <= 0:
        return adapter.encode_images(images)
    fingerprint = vision_fingerprint(adapter)
    keys = [(image_hash(im), fingerprint) for im in images]
    found: dict[tuple[str, str], ImageFeatures] = {}
    missing: dict[tuple[str, str], Image.Image] = {}
    for key, image in zip(keys, images):
        if key in found or key in missing:
            continue
        entry = adapter.feature_cache.get(key)
        if entry is None:
            missing[key] = image
        else:
            found[key] = entry
    todo = list(missing.items())
    training = adapter.model.training
    adapter.model.eval()  # cached features must not depend on the mode (dropout) they were computed in
    per_batch = VISION_BATCH if adapter.device.type == "cuda" else VISION_BATCH_CPU
    for start, stop in chunks(len(todo), per_batch):
        with torch.no_grad():
            encoded = adapter.encode_images([image for _, image in todo[start:stop]])
        for (key, _), entry in zip(todo[start:stop], encoded):
            # a copy: a view would keep the whole batch's features alive
            entry = ImageFeatures(entry.features.to("cpu", copy=True), entry.info)
            found[key] = entry
            adapter.feature_cache.put(key, entry)
    adapter.model.train(training)
    return [found[key] for key in keys]
