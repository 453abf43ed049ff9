"""MNIST IDX parsing, checksums, folder layouts and error messages, on files written here."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
import torch

from experiments import data
from experiments.data import FILES, IdxFile, MnistError, locate, parse_idx, read_verified
from experiments.files import atomic_write
from qcnn.training import batches


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


IMAGES = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
LABELS = np.array([7, 2, 1], dtype=np.uint8)
SMALL_IMAGES = IdxFile("images", "", 2051, 3)
SMALL_LABELS = IdxFile("labels", "", 2049, 3)


def test_parse_images_and_labels():
    np.testing.assert_array_equal(parse_idx(idx_bytes(IMAGES, 2051), SMALL_IMAGES, "f"), IMAGES)
    np.testing.assert_array_equal(parse_idx(idx_bytes(LABELS, 2049), SMALL_LABELS, "f"), LABELS)


@pytest.mark.parametrize(
    "raw,expected,match",
    [
        (b"\x00\x00", SMALL_IMAGES, "truncated"),
        (idx_bytes(IMAGES, 2049), SMALL_IMAGES, "wrong magic number 2049"),
        (idx_bytes(IMAGES[:2], 2051), SMALL_IMAGES, "wrong count 2, expected 3"),
        (idx_bytes(IMAGES, 2051)[:-5], SMALL_IMAGES, "truncated"),
        (idx_bytes(IMAGES[:, :20, :20], 2051), SMALL_IMAGES, "20x20"),
    ],
)
def test_parse_errors_name_file_and_problem(raw, expected, match):
    with pytest.raises(MnistError, match=match) as error:
        parse_idx(raw, expected, "some/file-idx3-ubyte")
    assert "some/file-idx3-ubyte" in str(error.value)


def test_checksum_raw_and_gz(tmp_path):
    raw = idx_bytes(LABELS, 2049)
    expected = IdxFile("labels", hashlib.md5(raw).hexdigest(), 2049, 3)
    (tmp_path / "plain").write_bytes(raw)
    (tmp_path / "packed.gz").write_bytes(gzip.compress(raw))
    assert read_verified(tmp_path / "plain", expected) == raw
    assert read_verified(tmp_path / "packed.gz", expected) == raw
    (tmp_path / "bad").write_bytes(raw[:-1] + b"\x09")
    with pytest.raises(MnistError, match="checksum mismatch"):
        read_verified(tmp_path / "bad", expected)


def test_locate_layouts_and_incomplete_folder(tmp_path):
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for idx in FILES.values():
        (raw / f"{idx.name}.gz").write_bytes(b"")
    assert set(locate(tmp_path / "tv")) == set(FILES)
    assert locate(tmp_path / "empty") is None
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / FILES["train_images"].name).write_bytes(b"")
    with pytest.raises(MnistError, match="missing"):
        locate(flat)


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(MnistError, match="no such folder"):
        data.load_uint8(tmp_path / "nowhere")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "cache.pt"

    def fail_halfway(handle):
        handle.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail_halfway)
    assert list(tmp_path.iterdir()) == []


def test_real_mnist_from_torchvision_layout(tmp_path, mnist_raw_dir):
    """The real files, gzipped in torchvision's layout, parse to the same tensors."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    cached = locate(mnist_raw_dir)  # raw or .gz, as the cache happens to hold them
    for key, idx in FILES.items():
        content = read_verified(cached[key], idx)
        if key.startswith("test"):
            (raw / f"{idx.name}.gz").write_bytes(gzip.compress(content, compresslevel=1))
        else:
            (raw / idx.name).write_bytes(content)
    arrays = data.load_uint8(tmp_path)
    assert arrays["train_images"].shape == (60000, 28, 28)
    assert arrays["test_labels"][:5].tolist() == [7, 2, 1, 0, 4]


def test_normalisation_and_batches(mnist_small):
    assert mnist_small.train_images.shape == (2000, 1, 28, 28)
    assert mnist_small.train_images.dtype == torch.float32
    assert abs(mnist_small.train_images.mean().item()) < 0.05  # normalised with MNIST's mean/std
    order = list(batches(mnist_small.test_images, mnist_small.test_labels, 300))
    assert [len(y) for _, y in order] == [300, 300, 300, 100]
    shuffled = [y for _, y in batches(mnist_small.test_images, mnist_small.test_labels, 300,
                                      torch.Generator().manual_seed(0))]  # fmt: skip
    again = [y for _, y in batches(mnist_small.test_images, mnist_small.test_labels, 300,
                                   torch.Generator().manual_seed(0))]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again, strict=True))
    assert sorted(torch.cat(shuffled).tolist()) == sorted(mnist_small.test_labels.tolist())
