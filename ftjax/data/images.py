"""grain input pipeline for image classification: exact-resume train batches with
augmentation, complete eval passes, and per-process slices.

The same contract as ftjax/data/pipeline.py's TextData. The train order of epoch e is
`pipeline.epoch_order(n, seed, e)`; the augmentation of row r of global step s draws
from a generator seeded by (seed, s, r) alone. So every batch is a pure function of
(seed, step): `train_batches(start_step=s)` starts at step s with no replay, and each
process decodes only its own rows of the global batch yet gets exactly the rows a
single process would.

Images are decoded and resized with PIL (which releases the GIL, so grain's read
threads, data.num_threads, run in parallel), cropped, flipped and normalised with
numpy. Sources may hold decoded uint8 arrays [H, W, C] (TFDS Image or Tensor
features) or encoded bytes (image_folder); JPEG bytes are decoded at a reduced scale
when the target size allows (PIL `draft`), which is most of the speed on photos.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from ftjax.data.pipeline import SplitData
from ftjax.errors import UserError

Batch = dict[str, np.ndarray]
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0..255 units
IMAGENET_STD = (58.395, 57.12, 57.375)
RESIZE = ("resize", "resize_crop")
TRAIN_AUGMENT = ("none", "random_resized_crop", "pad_crop")
RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos")
# Encoded formats read (PIL's JPEG plugin also opens MPO, a JPEG with extra frames). PIL tries no other
# plugin: some of them run programs (EPS runs Ghostscript).
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold, as an error rather than a warning
# Decoded bytes a file may declare: zlib and LZW inflate at most ~1000-3000x; a floor for small files.
_MAX_INFLATION, _INFLATION_FLOOR = 4096, 16 << 20


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def open_encoded(data: bytes, what: str, min_side: int = 0):
    """Opens encoded image bytes with PIL (header only), refusing what no real image declares.

    Args:
      data: the encoded file (JPEG, PNG, BMP, GIF or WEBP).
      what: how messages name it ("image cats/1.jpg").
      min_side: JPEGs are set to decode at a reduced scale keeping both sides >= this (0: full).

    Returns:
      The opened PIL image, not yet decoded.

    Raises:
      UserError: another format, an unreadable header, more than MAX_PIXELS pixels, or more
        decoded bytes than the file could inflate to (a damaged header or a decompression bomb).
    """
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
        if min_side and im.format in ("JPEG", "MPO"):
            im.draft("RGB", (min_side, min_side))  # >= min_side on both sides
        w, h = im.size
        decoded = w * h * len(im.getbands())
    except Image.UnidentifiedImageError:
        raise UserError(f"{what} cannot be read: it is not a JPEG, PNG, BMP, GIF or WEBP file") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad header
        raise UserError(f"{what} cannot be read ({_reason(e)}); the file is damaged") from None
    if w * h > MAX_PIXELS or decoded > _MAX_INFLATION * len(data) + _INFLATION_FLOOR:
        raise UserError(f"{what} declares {w} x {h} pixels in {len(data)} bytes, more than a real image "
                        f"of that size holds (limit {MAX_PIXELS} pixels); the file is damaged or a "
                        "decompression bomb")
    return im


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """How a raw image becomes a float32 [S, S, 3] model input.

    Attributes:
      image_size: S, the square output size.
      resize: eval geometry: "resize" (straight to S x S, aspect not kept) or
        "resize_crop" (shorter side to S / crop_fraction, then the central S x S).
      crop_fraction: of "resize_crop" (0.875: 256 -> 224).
      train_augment: train geometry: "none" (the eval geometry), "random_resized_crop"
        (a crop of crop_scale of the area and aspect ratio in crop_ratio, uniform in
        log-ratio, resized to S x S; Inception / torchvision style with 10 tries and a
        center-crop fallback) or "pad_crop" (the "resize" geometry, zero-padded by
        crop_padding on each side, then a random S x S crop: CIFAR style).
      crop_scale: (min, max) area fraction of "random_resized_crop".
      crop_ratio: (min, max) width / height of "random_resized_crop".
      crop_padding: pixels of "pad_crop".
      flip: random horizontal flip (p = 0.5) in training.
      mean: per-channel mean in 0..255 units (one value or three).
      std: per-channel std in 0..255 units (one value or three).
      resample: PIL filter: "nearest", "bilinear", "bicubic" or "lanczos".
    """

    image_size: int = 224
    resize: str = "resize_crop"
    crop_fraction: float = 0.875
    train_augment: str = "random_resized_crop"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_padding: int = 4
    flip: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resample: str = "bilinear"

    def __post_init__(self):
        def bad(key, value, why):
            raise UserError(f"data.{key}={value!r}: {why}")

        if self.image_size <= 0:
            bad("image_size", self.image_size, "must be positive")
        if self.resize not in RESIZE:
            bad("resize", self.resize, f"must be one of {', '.join(RESIZE)}")
        if not 0 < self.crop_fraction <= 1:
            bad("crop_fraction", self.crop_fraction, "must be in (0, 1]")
        if self.train_augment not in TRAIN_AUGMENT:
            bad("train_augment", self.train_augment, f"must be one of {', '.join(TRAIN_AUGMENT)}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            bad("crop_scale", self.crop_scale, "must be (min, max) with 0 < min <= max <= 1")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            bad("crop_ratio", self.crop_ratio, "must be (min, max) with 0 < min <= max")
        if self.crop_padding < 0:
            bad("crop_padding", self.crop_padding, "must be >= 0")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if len(value) not in (1, 3):
                bad(key, value, "must hold one value or three (per RGB channel)")
        if min(self.std) <= 0:
            bad("std", self.std, "must be positive")
        if self.resample not in RESAMPLE:
            bad("resample", self.resample, f"must be one of {', '.join(RESAMPLE)}")
        # Arrays for the hot path (frozen dataclass: set through object.__setattr__).
        object.__setattr__(self, "_mean", np.asarray(self.mean, np.float32))
        object.__setattr__(self, "_inv_std", 1 / np.asarray(self.std, np.float32))

    # ---- decoding ------------------------------------------------------------------

    def _open(self, image: Any, min_side: int):
        """A PIL image in mode "L" or "RGB" from an array or encoded bytes.

        Args:
          image: uint8 [H, W], [H, W, 1|3|4], or encoded bytes.
          min_side: JPEGs may be decoded at a reduced scale, keeping both sides >= this.
        """
        from PIL import Image

        if isinstance(image, (bytes, np.bytes_)):
            im = open_encoded(bytes(image), "the image", min_side)
        else:
            a = np.asarray(image)
            if a.ndim == 3 and a.shape[-1] == 1:
                a = a[:, :, 0]
            if (a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4))
                    or not a.size):
                raise UserError(f"expected a uint8 image [H, W] or [H, W, 1|3|4], got "
                                f"{a.dtype} {list(a.shape)}")
            im = Image.fromarray(a)
        # Grayscale stays one channel through resizing (3x cheaper) and is repeated to
        # RGB at the end; everything else (RGBA, palette, CMYK, ...) becomes RGB.
        if im.mode.startswith("I"):  # 16-bit grayscale: PIL's convert would clip, not scale
            im = Image.fromarray((np.asarray(im, np.float32) / 257).clip(0, 255).astype(np.uint8))
        elif im.mode not in ("L", "RGB"):
            im = im.convert("L" if im.mode in ("LA", "1") else "RGB")
        return im

    def _filter(self):
        from PIL import Image

        return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[self.resample]

    # ---- geometry ------------------------------------------------------------------

    def _eval_geometry(self, im) -> np.ndarray:
        s = self.image_size
        if self.resize == "resize":
            return np.asarray(im.resize((s, s), self._filter()))
        w, h = im.size
        # The center s x s of the image resized to shorter side s / crop_fraction is
        # the box of side s * shorter / (s / crop_fraction) in the original: one
        # resample from that box, no intermediate image.
        side = min(w, h) * self.crop_fraction
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return np.asarray(im.resize((s, s), self._filter(), box=box))

    def _random_resized_crop(self, im, rng: np.random.Generator) -> np.ndarray:
        w, h = im.size
        area = w * h
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            ratio = math.exp(rng.uniform(log_lo, log_hi))
            cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if cw <= w and ch <= h:
                x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                break
        else:  # a center crop of the largest box of allowed aspect
            ratio = min(max(w / h, self.crop_ratio[0]), self.crop_ratio[1])
            cw, ch = (w, w / ratio) if w / h < ratio else (h * ratio, h)
            x0, y0 = (w - cw) / 2, (h - ch) / 2
        s = self.image_size
        return np.asarray(im.resize((s, s), self._filter(), box=(x0, y0, x0 + cw, y0 + ch)))

    def _pad_crop(self, im, rng: np.random.Generator) -> np.ndarray:
        s, p = self.image_size, self.crop_padding
        a = np.asarray(im.resize((s, s), self._filter()) if im.size != (s, s) else im)
        if p:
            a = np.pad(a, ((p, p), (p, p)) + ((0, 0),) * (a.ndim - 2))
        y, x = rng.integers(0, 2 * p + 1, size=2)
        return a[y:y + s, x:x + s]

    def _finish(self, a: np.ndarray) -> np.ndarray:
        if a.ndim == 2:
            a = a[:, :, None]
        if a.shape[-1] == 1 and self._mean.size == 3:  # grayscale, per-channel statistics
            a = np.repeat(a, 3, axis=-1)
        out = a.astype(np.float32)
        out -= self._mean  # in place: half the time of (a - mean) * inv_std
        out *= self._inv_std
        if out.shape[-1] == 1:  # grayscale with one mean and std
            out = np.repeat(out, 3, axis=-1)
        return out

    # ---- public --------------------------------------------------------------------

    def eval_image(self, image: Any) -> np.ndarray:
        """The eval input: float32 [S, S, 3], deterministic.

        Args:
          image: uint8 [H, W] or [H, W, 1|3|4], or encoded image bytes.

        Returns:
          The normalised image.
        """
        side = self.image_size if self.resize == "resize" else self.image_size / self.crop_fraction
        with _decoding():
            return self._finish(self._eval_geometry(self._open(image, math.ceil(side))))

    def train_image(self, image: Any, rng: np.random.Generator) -> np.ndarray:
        """The train input: float32 [S, S, 3], augmented with draws from `rng` only.

        Args:
          image: uint8 [H, W] or [H, W, 1|3|4], or encoded image bytes.
          rng: the row's generator (seeded by seed, step and row).

        Returns:
          The augmented, normalised image.
        """
        with _decoding():
            return self._train_image(image, rng)

    def _train_image(self, image: Any, rng: np.random.Generator) -> np.ndarray:
        s = self.image_size
        if self.train_augment == "random_resized_crop":
            # Decode large enough that the smallest crop still has ~s pixels a side.
            side = math.ceil(s / math.sqrt(self.crop_scale[0]))
            a = self._random_resized_crop(self._open(image, side), rng)
        elif self.train_augment == "pad_crop":
            a = self._pad_crop(self._open(image, s), rng)
        else:
            side = s if self.resize == "resize" else s / self.crop_fraction
            a = self._eval_geometry(self._open(image, math.ceil(side)))
        if self.flip and rng.random() < 0.5:
            a = a[:, ::-1]
        return self._finish(a)


@contextlib.contextmanager
def _decoding():
    """Decoding errors of damaged image data (PIL raises many types) as one UserError line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"the image cannot be decoded ({_reason(e)}); the file is damaged or truncated") from None


def make_preprocess(config) -> ImagePreprocess:
    """The ImagePreprocess of config.data (image_size, resize, crop_*, flip, mean, std, ...)."""
    d = config.data
    return ImagePreprocess(
        image_size=int(d.image_size), resize=d.resize, crop_fraction=float(d.crop_fraction),
        train_augment=d.train_augment, crop_scale=tuple(map(float, d.crop_scale)),
        crop_ratio=tuple(map(float, d.crop_ratio)), crop_padding=int(d.crop_padding),
        flip=bool(d.flip), mean=tuple(map(float, d.mean)), std=tuple(map(float, d.std)),
        resample=d.resample)


class _Batcher:
    """Global batch indices -> this process's rows, decoded and preprocessed."""

    def __init__(self, data: ImageData, role: str, train: bool):
        self.source = data._sources.splits[role]
        self.split = data._sources.split_names[role]
        self.image_key, self.label_key = data._sources.image_key, data._sources.label_key
        self.num_labels, self.preprocess, self.train = data.num_labels, data._preprocess, train
        self.seed = data._seed
        self.process_index, self.process_count = data._process_index, data._process_count
        self.wants_lengths = False  # every image is one input: no padding to agree on

    def _image(self, index: int, record: dict, step: int | None, row: int) -> np.ndarray:
        try:
            if not self.train:
                return self.preprocess.eval_image(record[self.image_key])
            rng = np.random.default_rng([self.seed % (1 << 32), step, row, 0x1A6E])
            return self.preprocess.train_image(record[self.image_key], rng)
        except UserError as e:  # e.g. undecodable bytes of a catalog dataset
            path = record.get("path") or record.get("file_name")
            where = f" ({path.decode(errors='replace') if isinstance(path, bytes) else path})" if path else ""
            raise UserError(f"split {self.split!r}: example {index}{where}: {e}") from None

    def __call__(self, indices: np.ndarray, mask: np.ndarray | None, *, step: int | None = None,
                 lengths: np.ndarray | None = None) -> Batch:
        del lengths
        b = len(indices) // self.process_count
        lo = self.process_index * b
        s = self.preprocess.image_size
        images = np.empty((b, s, s, 3), np.float32)
        labels = np.empty(b, np.int32)
        # Only this process's rows are read and decoded; the row's randomness depends
        # on its global position, so slices match a single process's batch exactly.
        for j, row in enumerate(range(lo, lo + b)):
            index = int(indices[row])
            record = self.source[index]
            label = int(record[self.label_key])
            if not 0 <= label < self.num_labels:
                raise UserError(f"split {self.split!r}: example {index} has label {label}, "
                                f"outside [0, {self.num_labels}); check data.label_key and the "
                                "split's labels")
            labels[j] = label
            images[j] = self._image(index, record, step, row)
        batch = {"image": images, "label": labels}
        if mask is not None:
            batch["mask"] = mask[lo:lo + b].astype(np.float32)
        return batch


class ImageData(SplitData):
    """Train and eval batches of an image classification dataset.

    Attributes:
      label_names: class names.
      num_labels: number of classes.
      image_key: the feature read as the image.
      image_size: S of the [b, S, S, 3] batches.
      steps_per_epoch: full train batches per epoch (the last partial one is dropped).
    """

    def __init__(self, config, preprocess: ImagePreprocess, process_index: int = 0,
                 process_count: int = 1):
        """Prepares the dataset if needed and opens its splits.

        Batches: image (float32 [b, S, S, 3]) and label (int32 [b]), b = batch_size //
        process_count.

        Args:
          config: the experiment config (config.data, seed, batch_size, eval_batch_size).
          preprocess: from `make_preprocess(config)` (or built for the model).
          process_index: this process (jax.process_index()).
          process_count: all processes (jax.process_count()).
        """
        d = config.data
        self._open(config, process_index, process_count)
        if self._sources.image_key is None:
            raise UserError(f"dataset {d.name} has no image feature data.image_key="
                            f"{d.image_key!r}; is it a text dataset?")
        if self._sources.regression:
            raise UserError(f"dataset {d.name}: label {self._sources.label_key!r} is a float; "
                            "image data supports class labels only")
        for role in ("train", "dev"):
            if role not in self._sources.splits:
                hint = ("add a dev/ folder or set data.dev_fraction > 0" if d.name == "image_folder"
                        else f"set data.{role}_split (splits of fashion_mnist: train, dev, test)"
                        if d.name == "fashion_mnist" else f"set data.{role}_split")
                raise UserError(f"dataset {d.name} has no {role} split: {hint}")
        self._preprocess = preprocess
        self._num_threads = max(1, int(d.num_threads))
        self.num_labels: int = len(self.label_names)
        self.image_key: str = self._sources.image_key
        self.image_size: int = preprocess.image_size
        self._count(config)

    def _iterate(self, ds: grain.MapDataset, num_workers: int) -> Iterator[Batch]:
        # Read threads build whole batches in parallel (in order): PIL decodes and
        # resizes without the GIL.
        read = grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=2 * self._num_threads + 2)
        return self._iterate_with(ds, read, num_workers)

    def _batcher(self, role: str, train: bool) -> _Batcher:
        return _Batcher(self, role, train=train)

    def export_meta(self) -> dict[str, Any]:
        """What an export needs to preprocess raw images the way this run evaluated."""
        return {"image_size": int(self.image_size), "preprocess": dataclasses.asdict(self._preprocess)}
