"""Deterministic training of the reference model on the embedded Fashion-MNIST, cached by its full config.

The cache key hashes the architecture, its arguments, the training config, the data files' sizes and the
torch version, so a changed setting retrains and an unchanged one loads in about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .adapters.spec import ModelSpec
from .batches import predict
from .checkpoint import load, save
from .data import FASHION_MNIST_FILES, FashionMNIST, fashion_mnist_dir, loader
from .distributed import barrier, is_distributed, is_main
from .errors import CompressError
from .evaluate import accuracy
from .rebuild import build


MIN_ONE_CYCLE_STEPS = 8  # fewer steps leave the one-cycle warm-up phase empty (torch divides by zero): constant lr


@dataclass(frozen=True)
class TrainConfig:
    """AdamW with a one-cycle schedule; ``seed`` fixes the initial weights and the batch order."""

    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    train_samples: int | None = None  # a seeded subset of the training set (tests); None: all 60k
    device: str | None = None  # where to train ("cuda", ...); None: the CPU. Part of the cache key when set.


def cache_dir() -> Path:
    """$COMPRESS_CACHE, else $XDG_CACHE_HOME/compress, else ~/.cache/compress."""
    root = os.environ.get("COMPRESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compress"
    return Path(root)


def _fashion_mnist_fingerprint() -> list[int]:
    folder = fashion_mnist_dir()
    return [(folder / f).stat().st_size for pair in FASHION_MNIST_FILES.values() for f in pair]


def cache_key(spec: ModelSpec, config: TrainConfig) -> str:
    payload = {"spec": {k: v for k, v in spec.to_dict().items() if k != "weights"}, "train": {k: v for k, v in asdict(config).items() if v is not None},
               "data": ["fashion-mnist", _fashion_mnist_fingerprint()], "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def training_set(config: TrainConfig, channels: int = 1, image_size: int = 28) -> Dataset:
    """Fashion-MNIST train split, or the seeded subset of ``config.train_samples`` images."""
    data = FashionMNIST("train", channels=channels, image_size=image_size)
    if config.train_samples is None:
        return data
    picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))[: config.train_samples]
    return Subset(data, picked.sort().values.tolist())


def train(model: nn.Module, data: Dataset, config: TrainConfig, progress: bool = True) -> nn.Module:
    """Train ``model`` in place with cross-entropy on labelled ``data`` (on ``config.device``, then back where it was)."""
    home = next(model.parameters()).device
    device = torch.device(config.device or home)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(data) // config.batch_size
    if steps_per_epoch < 1 or config.epochs < 1:
        raise CompressError(f"nothing to train: {len(data)} samples, batch {config.batch_size}, {config.epochs} epochs",
                            "use at least one epoch and a batch size below the data size")
    total = config.epochs * steps_per_epoch
    schedule = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total, pct_start=0.25)
                if total >= MIN_ONE_CYCLE_STEPS else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0))
    model.train()
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress)
    for epoch in range(config.epochs):
        for x, y in loader(data, config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch, drop_last=True):
            loss = nn.functional.cross_entropy(predict(model, x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.to(home).eval()


def reference_model(spec: ModelSpec, config: TrainConfig = TrainConfig(), progress: bool = True) -> nn.Module:
    """The model of ``spec`` trained on Fashion-MNIST with ``config``; trained once, then loaded from the cache.
    Under torch.distributed rank 0 trains and caches it while the others wait, then load it."""
    if spec.input_shape[1:] != (28, 28) and spec.input_shape[0] not in (1, 3):
        raise CompressError(f"{spec.arch} with input {spec.input_shape} cannot train on Fashion-MNIST",
                            "use small_resnet, or an input shape (1|3, H, W)")
    spec = replace(spec, weights=f"train:fashion-mnist:{cache_key(spec, config)}")
    path = cache_dir() / f"{spec.arch}-{cache_key(spec, config)}.pt"
    if is_distributed() and not path.is_file():
        model = _train_and_cache(spec, config, path, progress) if is_main() else None
        barrier()
        return model if model is not None else load(path)
    if path.is_file():
        try:
            return load(path)
        except CompressError as err:  # a damaged cache entry is rebuilt, and we say so
            print(f"warning: cached model {path} unusable ({err}); retraining")
            path.unlink()
    return _train_and_cache(spec, config, path, progress)


def _train_and_cache(spec: ModelSpec, config: TrainConfig, path: Path, progress: bool) -> nn.Module:
    """Train the model of ``spec`` and save it at ``path`` with its training time and test top-1."""
    torch.manual_seed(config.seed)
    model = build(spec)
    channels, size = spec.input_shape[0], spec.input_shape[-1]
    start = time.perf_counter()
    train(model, training_set(config, channels, size), config, progress)
    seconds = time.perf_counter() - start
    top1 = accuracy(model, loader(FashionMNIST("test", channels=channels, image_size=size), 500), progress=False).top1
    save(model, path, overwrite=True, metadata={"train_seconds": seconds, "test_top1": top1, "train_config": asdict(config)})
    return model
