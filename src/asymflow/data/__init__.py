"""Image data: uint8 NHWC arrays with int64 labels from four sources (scikit-learn digits,
seeded synthetic patterns, image folders, CIFAR pickles), and their normalized, augmented
torch view."""

from asymflow.data.cifar import (
    CIFAR10_CLASSES,
    UnsafePickleError,
    load_cifar10,
    load_cifar100,
    read_cifar_pickle,
)
from asymflow.data.dataset import (
    ImageData,
    ImageSplit,
    TensorImageDataset,
    augment_batch,
    channel_stats,
    crop_and_flip,
)
from asymflow.data.digits import load_digits
from asymflow.data.folders import default_cache_dir, load_folder
from asymflow.data.registry import load_data
from asymflow.data.synthetic import synthetic

__all__ = [
    "CIFAR10_CLASSES",
    "ImageData",
    "ImageSplit",
    "TensorImageDataset",
    "UnsafePickleError",
    "augment_batch",
    "channel_stats",
    "crop_and_flip",
    "default_cache_dir",
    "load_cifar10",
    "load_cifar100",
    "load_data",
    "load_digits",
    "load_folder",
    "read_cifar_pickle",
    "synthetic",
]
