"""Data: the embedded Fashion-MNIST set, ImageNet-style folders, label-free calibration batches.

``data`` anywhere in this toolkit is any iterable of input batches, of ``(input, label, ...)`` batches or of dicts
of named tensors (a tokenized batch; labels under ``labels``); an input is a tensor or a dict of named tensors
(:mod:`compress.batches`). The criteria only ever see inputs (:func:`iter_inputs`). Labels are read for accuracy and nothing else.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from .batches import LABEL_KEYS, Inputs, first_rows, rows
from .distributed import rank_and_world, rank_share
from .errors import CompressError
from .images import check_unreadable, scan

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INSTALL_HINT = ("run `make data` (apt-get install dataset-fashion-mnist, as root) or point FASHION_MNIST_DIR / "
                "--fmnist-dir at a folder holding the four idx .gz files")


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the Fashion-MNIST idx .gz files: ``root``, else $FASHION_MNIST_DIR, else Debian's."""
    folder = Path(root or os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair if not (folder / f).is_file()]
    if missing:
        raise CompressError(f"Fashion-MNIST not found: {folder} lacks {', '.join(missing)}", INSTALL_HINT)
    return folder


def _read_idx(path: Path, offset: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)
    except (OSError, EOFError, ValueError) as err:
        raise CompressError(f"cannot read {path}: {err}", "reinstall dataset-fashion-mnist or replace the file") from err


@functools.lru_cache(maxsize=4)
def _fashion_mnist_arrays(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    image_file, label_file = FASHION_MNIST_FILES[split]
    images = _read_idx(Path(folder) / image_file, 16)
    labels = _read_idx(Path(folder) / label_file, 8)
    if images.size != labels.size * 28 * 28:
        raise CompressError(f"Fashion-MNIST {split} files in {folder} disagree in length", INSTALL_HINT)
    return torch.from_numpy(images.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Fashion-MNIST read straight from the idx .gz files (60k train / 10k test, real labels).

    Items are ``(image, label)`` with ``image`` normalised float32 of shape (channels, size, size); ``channels=3``
    and ``image_size=224`` give the upsampled variant for ImageNet-shaped networks. Batched fetching
    (``__getitems__``) transforms a whole batch at once, so a DataLoader over it is cheap.
    """

    fetches_batches = True  # __getitems__ returns a collated (images, labels) batch

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, *, channels: int = 1,
                 image_size: int = 28) -> None:
        if split not in FASHION_MNIST_FILES:
            raise CompressError(f"unknown Fashion-MNIST split {split!r}", "use 'train' or 'test'")
        if channels not in (1, 3):
            raise CompressError(f"channels={channels} is not supported", "use channels=1 or channels=3")
        self.split, self.channels, self.image_size = split, channels, image_size
        self.images, self.labels = _fashion_mnist_arrays(str(fashion_mnist_dir(root)), split)
        self.classes = FASHION_MNIST_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def _transform(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        if self.image_size != 28:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x.expand(-1, self.channels, -1, -1).contiguous() if self.channels != 1 else x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._transform(self.images[index:index + 1])[0], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self._transform(self.images[idx]), self.labels[idx]


def _collate_batched(batch: Any) -> Any:
    """Collate for datasets whose ``__getitems__`` already returns a batch."""
    return batch


def _fetches_batches(dataset: Dataset) -> bool:
    """Whether ``dataset[...]`` batched fetching (through any Subsets) already returns a collated batch."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return bool(getattr(dataset, "fetches_batches", False))


def image_folder(root: str | os.PathLike, split: str | None = "val", *, image_size: int = 224,
                 train: bool = False, check_images: bool = True) -> Dataset:
    """An ImageNet-layout folder (``root/[split/]class/image``) with torchvision's standard transforms.

    ``check_images``: decode every file once first; unreadable ones are dropped and listed in
    ``dataset.unreadable``, and more than 1% of the split unreadable is a one-line error."""
    from torchvision import datasets, transforms

    folder = Path(root)
    if not folder.is_dir():
        raise CompressError(f"data folder {folder} does not exist", "pass --data DIR with class sub-folders (ImageNet layout)")
    if split and (folder / split).is_dir():
        folder = folder / split
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), normalize])
    else:
        tf = transforms.Compose([transforms.Resize(int(round(image_size * 256 / 224))),
                                 transforms.CenterCrop(image_size), transforms.ToTensor(), normalize])
    try:
        dataset = datasets.ImageFolder(str(folder), transform=tf)
    except (FileNotFoundError, RuntimeError) as err:
        raise CompressError(f"{folder} is not an image folder: {str(err).splitlines()[0]}",
                            "lay it out as DIR/class_name/image.jpg (ImageNet layout)") from err
    return _without_unreadable(dataset, folder) if check_images else dataset


def _without_unreadable(dataset: Any, folder: Path) -> Any:
    """``dataset`` with the images that cannot be decoded dropped and listed in ``dataset.unreadable``; a one-line
    error when more than 1% of them are unreadable (see :mod:`compress.images`)."""
    paths = tuple(path for path, _ in dataset.samples)
    bad = scan(paths, workers=max(2, 2 * available_cores()))
    check_unreadable(folder, paths, bad)
    skipped = {b.path for b in bad}
    dataset.samples = [s for s in dataset.samples if s[0] not in skipped]
    dataset.imgs, dataset.targets = dataset.samples, [label for _, label in dataset.samples]
    dataset.unreadable = list(bad)
    return dataset


def synthetic(n: int = 64, shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, seed: int = 0) -> TensorDataset:
    """Random inputs and labels, for tests of mechanics only: never quote an accuracy measured on it."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g))


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader(dataset: Dataset, batch_size: int = 128, *, shuffle: bool = False, seed: int = 0,
           drop_last: bool = False, workers: int = 0, shard: bool = False) -> DataLoader:
    """A DataLoader whose order depends only on ``seed``; ``workers`` decode images in parallel (image folders),
    at most one per available core (more only make the DataLoader warn and thrash).

    ``shard=True`` under torch.distributed: each rank loads its share of every global batch of ``batch_size``
    (``batch_size // world`` items, from a seeded ``DistributedSampler`` that pads the epoch to a multiple of the
    world size), for data-parallel training."""
    batched = _fetches_batches(dataset)
    _, world = rank_and_world()
    sampler = None
    if shard and world > 1:
        if batch_size % world:
            raise CompressError(f"a global batch of {batch_size} cannot be split over {world} processes",
                                f"use a batch size that is a multiple of {world}")
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        batch_size, shuffle = batch_size // world, False
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, sampler=sampler,
                      generator=torch.Generator().manual_seed(seed), collate_fn=_collate_batched if batched else None,
                      num_workers=0 if batched else min(workers, available_cores()))


def inputs_of(batch: Any) -> Inputs:
    """The model inputs of a batch: a tensor, the first item of an ``(input, label, ...)`` sequence, or a mapping of
    named tensors without its labels (``labels`` / ``label``)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, Mapping)):
        return batch[0]
    if isinstance(batch, Mapping):
        named = {k: v for k, v in batch.items() if k not in LABEL_KEYS and isinstance(v, torch.Tensor)}
        if named:
            return named
    raise CompressError(f"a data batch of type {type(batch).__name__} holds no input tensor",
                        "yield input tensors, (input, label) pairs or dicts of named tensors")


def labels_of(batch: Any) -> torch.Tensor | None:
    """The label tensor of an ``(input, label, ...)`` batch or of a dict batch's ``labels``, or None."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        return next((batch[k] for k in LABEL_KEYS if isinstance(batch.get(k), torch.Tensor)), None)
    return None


def _stacked(items: Sequence[Any], with_labels: bool) -> tuple[Inputs, torch.Tensor | None]:
    """Dataset items (each an input and a label, or a dict of named tensors) stacked into one batch."""
    inputs = [inputs_of(it) for it in items]
    x = ({k: torch.stack([i[k] for i in inputs]) for k in inputs[0]} if isinstance(inputs[0], Mapping)
         else torch.stack(inputs))
    if not with_labels:
        return x, None
    labels = [labels_of(it) if isinstance(it, Mapping) else it[1] for it in items]
    return x, torch.as_tensor([int(y) for y in labels])


def iter_inputs(data: Iterable[Any]) -> Iterator[Inputs]:
    """The input tensors of ``data``, labels dropped."""
    for batch in data:
        yield inputs_of(batch)


@dataclass(frozen=True)
class CalibrationData:
    """A label-free, re-iterable, seeded set of input batches: what every criterion consumes.

    Built from a map-style dataset it is a fixed random subset of ``num_samples`` items (chosen by ``seed``);
    built from any other iterable it is the inputs of the first batches that add up to ``num_samples``.
    Under torch.distributed a dataset's subset is sharded: each rank reads every world-size-th item of it (the
    union over ranks is the single-process subset); an iterable is taken as this rank's own data.
    """

    source: Any
    num_samples: int
    batch_size: int
    seed: int
    with_labels: bool = False  # yield (input, label) batches, for supervised baselines only

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.source, Dataset) and hasattr(self.source, "__len__"):
            subset = self._subset()
            ds = self.source
            for start in range(0, len(subset), self.batch_size):
                idx = subset[start:start + self.batch_size]
                if _fetches_batches(ds):
                    batch = ds.__getitems__(idx)
                else:
                    batch = _stacked([ds[i] for i in idx], self.with_labels)
                yield self._select(batch)
            return
        seen = 0
        for batch in self.source:
            if seen >= self.num_samples:
                return
            keep = self.num_samples - seen
            x, y = first_rows(inputs_of(batch), keep), labels_of(batch)
            seen += rows(x)
            yield self._select((x, None if y is None else y[:keep]))

    def _subset(self) -> list[int]:
        """This rank's indices of the seeded subset of a dataset (all of them in a single process)."""
        n = min(self.num_samples, len(self.source))
        _, world = rank_and_world()
        if n < world:
            raise CompressError(f"{n} calibration samples cannot be shared by {world} processes",
                                f"use at least {world} samples, or fewer processes")
        g = torch.Generator().manual_seed(self.seed)
        return rank_share(torch.randperm(len(self.source), generator=g)[:n].sort().values.tolist())

    def _select(self, batch: Any) -> Any:
        x, y = inputs_of(batch), labels_of(batch)
        if not self.with_labels:
            return x
        if y is None:
            raise CompressError("these calibration batches carry no labels", "pass (input, label) batches")
        return x, y

    def __len__(self) -> int:
        """Number of batches (for progress bars); exact for datasets, an upper bound otherwise."""
        sized = isinstance(self.source, Dataset) and hasattr(self.source, "__len__")
        n = len(self._subset()) if sized else self.num_samples
        return -(-n // self.batch_size)


def calibration(data: Any, num_samples: int = 1024, batch_size: int = 64, seed: int = 0,
                with_labels: bool = False) -> CalibrationData:
    """Label-free calibration batches: ``num_samples`` inputs from a dataset (seeded subset) or a batch iterable.

    ``with_labels=True`` yields ``(input, label)`` batches instead, for supervised baselines (``jacobian``)."""
    if num_samples < 1 or batch_size < 1:
        raise CompressError(f"calibration needs num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}",
                            "pass positive values")
    return CalibrationData(data, num_samples, batch_size, seed, with_labels)
