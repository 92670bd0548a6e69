"""MNIST for the examples and benchmarks: the original IDX files, or TensorFlow Datasets.

    from mnist_data import load_mnist, to_float, train_heldout_split

    images, labels = load_mnist("path/to/mnist", split="test")  # IDX files, no download
    images, labels = load_mnist(split="train")                   # tensorflow_datasets
    x = to_float(images)                     # (N, 784) float32 in [0, 1]
    x = to_float(images, flatten=False)      # (N, 28, 28, 1)
    (x_train, y_train), (x_held, y_held) = train_heldout_split(x, labels, 0.2, seed=0)

A data directory holds the files as LeCun distributes them, gzipped or not:
`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]` for the 60,000
training images and `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`
for the 10,000 test images. Without a data directory, `tensorflow_datasets`
loads (and on first use downloads) its `mnist` dataset.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

IMAGE_MAGIC = 2051  # IDX: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # IDX: unsigned bytes, 1 dimension
ROWS = COLS = 28
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}


class MnistFormatError(ValueError):
    """An MNIST IDX file is missing or is not what its name says."""


def idx_file_names(split: str) -> tuple[str, str]:
    """The (images, labels) IDX file names of a split, without the `.gz` suffix."""
    if split not in SPLIT_PREFIXES:
        raise ValueError(
            f"MNIST IDX files come in the splits {sorted(SPLIT_PREFIXES)}; "
            f"received split={split!r}."
        )
    prefix = SPLIT_PREFIXES[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"MNIST file not found: expected {name} or {name}.gz in {data_dir} "
        "(the original IDX files from http://yann.lecun.com/exdb/mnist/, gzipped or not)."
    )


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise MnistFormatError(f"Cannot read {path}: {error}") from error


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An IDX array of unsigned bytes with `dims` dimensions, its header checked."""
    data = _read_bytes(path)
    header_size = 4 * (1 + dims)
    if len(data) < header_size:
        raise MnistFormatError(
            f"{path} is not an MNIST IDX file: {len(data)} bytes, shorter than its "
            f"{header_size}-byte header."
        )
    header = np.frombuffer(data, dtype=">u4", count=1 + dims)
    if int(header[0]) != magic:
        raise MnistFormatError(
            f"{path} is not an MNIST {'image' if magic == IMAGE_MAGIC else 'label'} IDX file: "
            f"magic number {int(header[0])}, expected {magic}."
        )
    shape = tuple(int(n) for n in header[1:])
    expected = int(np.prod(shape))
    body = len(data) - header_size
    if body != expected:
        raise MnistFormatError(
            f"{path} is truncated or malformed: its header announces shape {shape} "
            f"({expected} bytes of data) but it holds {body} bytes after the header."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def _load_idx(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST data directory {folder} does not exist.")
    image_name, label_name = idx_file_names(split)
    image_path, label_path = _find(folder, image_name), _find(folder, label_name)
    images = _read_idx(image_path, IMAGE_MAGIC, 3)
    labels = _read_idx(label_path, LABEL_MAGIC, 1)
    if images.shape[1:] != (ROWS, COLS):
        raise MnistFormatError(
            f"{image_path} holds images of {images.shape[1]}x{images.shape[2]} pixels; "
            f"MNIST's are {ROWS}x{COLS}."
        )
    if len(images) != len(labels):
        raise MnistFormatError(
            f"{image_path} holds {len(images)} images but {label_path} holds "
            f"{len(labels)} labels."
        )
    if labels.size and labels.max() > 9:
        raise MnistFormatError(f"{label_path} holds a label {labels.max()}; MNIST's are 0-9.")
    return images.copy(), labels.astype(np.int64)


def _load_tfds(split: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    # Batched in chunks rather than with `batch_size=-1`: that batches by the
    # split's size from the dataset's metadata, which `tfds.testing.mock_data`
    # leaves empty, and the resulting batch of sys.maxsize aborts the process.
    dataset = tfds.load("mnist", split=split, as_supervised=True)
    images, labels = [], []
    for image_batch, label_batch in tfds.as_numpy(dataset.batch(10_000)):
        images.append(image_batch)
        labels.append(label_batch)
    if not images:
        return np.zeros((0, ROWS, COLS), np.uint8), np.zeros((0,), np.int64)
    images_array = np.concatenate(images).reshape(-1, ROWS, COLS)
    return images_array.astype(np.uint8), np.concatenate(labels).astype(np.int64)


def load_mnist(
    data_dir: str | os.PathLike | None = None, split: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images and labels.

    Args:
        data_dir: a folder with the original IDX files (gzipped or not); `None`
            loads the `mnist` dataset of `tensorflow_datasets` instead, which
            downloads it on first use.
        split: `"train"` (60,000 images) or `"test"` (10,000). Without
            `data_dir`, any TFDS split string (e.g. `"train[:10%]"`).

    Returns:
        `(images, labels)`: uint8 images of shape (N, 28, 28), values 0-255, and
        int64 labels of shape (N,), values 0-9.

    Raises:
        FileNotFoundError: when `data_dir` or one of the split's files is missing
            (the message names the expected files).
        MnistFormatError: (a ValueError) when a file is not a valid MNIST IDX file.
    """
    if data_dir is not None:
        return _load_idx(data_dir, split)
    return _load_tfds(split)


def to_float(images: np.ndarray, flatten: bool = True) -> np.ndarray:
    """uint8 images as float32 in [0, 1]: shape (N, 784), or (N, 28, 28, 1) if not `flatten`."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    if flatten:
        return x.reshape(len(x), -1)
    return x.reshape(*x.shape[:3], 1)


def train_heldout_split(
    x: np.ndarray, y: np.ndarray, heldout_fraction: float, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A random split `((x_train, y_train), (x_heldout, y_heldout))`.

    `round(heldout_fraction * N)` examples, at least one, are held out; the
    same `seed` gives the same split.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(
            f"heldout_fraction must be in (0, 1); received heldout_fraction={heldout_fraction!r}."
        )
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} and {len(y)}.")
    n = len(x)
    heldout = max(1, int(round(heldout_fraction * n)))
    if heldout >= n:
        raise ValueError(
            f"Cannot hold out {heldout_fraction:.0%} of {n} examples and keep some to train on."
        )
    order = np.random.default_rng(seed).permutation(n)
    train_idx, heldout_idx = order[heldout:], order[:heldout]
    return (x[train_idx], y[train_idx]), (x[heldout_idx], y[heldout_idx])
