"""What a Delta run is built from: its data, models and input statistics, the held-out rows,
the per-epoch views of stage 2 and what of them leaves, and the seeded draws (shuffles, crops,
noise seeds) that make a resumed run redraw the same ones."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from asymflow.data import ImageData, augment_batch, load_data, load_digits
from asymflow.delta.private import PrivateModel
from asymflow.delta.runs import DeltaConfig
from asymflow.models import Backbone, build_private_model, original_model, public_model


def epoch_generator(seed: int, stage: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator for (stage, epoch): a resumed run redraws the same shuffles and crops."""
    return torch.Generator().manual_seed(((seed * 7919 + stage) * 100_003 + epoch) * 8 + stream)


def epoch_order(n: int, seed: int, stage: int, epoch: int) -> np.ndarray:
    """The shuffle of ``n`` rows in (stage, epoch)."""
    return torch.randperm(n, generator=epoch_generator(seed, stage, epoch, stream=1)).numpy()


def row_chunks(n: int, size: int) -> Iterator[np.ndarray]:
    """Consecutive row indices of ``n`` rows, ``size`` at a time."""
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n))


def noise_seed(config: DeltaConfig, name: str) -> int | None:
    """The noise seed of release ``name`` (None: the OS's secure source)."""
    if config.noise_seed is None:
        return None
    return config.noise_seed * 1_000_003 + zlib.crc32(name.encode())


def load_run_data(config: DeltaConfig) -> ImageData:
    """The run's data set; ``digits`` is resized to ``config.image_size``. Its images must
    tile into t x t DCT blocks."""
    if config.data.strip().lower() == "digits":
        data = load_digits(size=config.image_size)
    else:
        data = load_data(config.data, progress=False)
    h, w, _ = data.train.image_shape
    if h % config.t or w % config.t:
        raise ValueError(
            f"t must divide the image height and width ({h}x{w}) for the block DCT, "
            f"got t={config.t}"
        )
    return data


def build_private(config: DeltaConfig, in_channels: int, num_classes: int) -> PrivateModel:
    """M_bb (conv3x3 -> ir_channels, BN, PReLU) and the low-rank M_main on r channels."""
    torch.manual_seed(config.seed)
    backbone = Backbone(in_channels, config.ir_channels)
    main = build_private_model(
        config.r, num_classes, widths=config.private_widths, ranks=config.private_ranks
    )
    return PrivateModel(backbone, main, r=config.r, t=config.t, t_low=config.t_low)


def build_public_factory(config: DeltaConfig, num_classes: int) -> Callable[[], nn.Module]:
    """A zero-argument factory of M_res: ``public_arch`` without its stem, on the payload's
    channels (ir_channels, or 1 for ``payload="channel-mean"``)."""
    channels = 1 if config.payload == "channel-mean" else config.ir_channels

    def factory() -> nn.Module:
        torch.manual_seed(config.seed + 1)
        return public_model(config.public_arch, channels, num_classes, width=config.public_width)

    return factory


PUBLIC_STATS = (0.5, 0.25)
"""Per-channel mean and std of a frozen-backbone run's inputs: fixed constants, so that the
normalization, like M_bb, does not depend on the training set."""


def input_stats(config: DeltaConfig, data: ImageData) -> tuple[tuple[float, ...], ...]:
    """Per-channel (mean, std) of the input normalization: the training set's own statistics
    with ``backbone="trained"`` (as in the paper), else :data:`PUBLIC_STATS` (a data set's
    statistics would make every released residual depend on every record)."""
    if config.backbone == "trained":
        return data.channel_stats()
    c = data.train.image_shape[2]
    return (PUBLIC_STATS[0],) * c, (PUBLIC_STATS[1],) * c


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of ``n``: a seeded ``fraction`` is held out from every
    private model (at least one row if ``fraction`` > 0), both sorted."""
    held = min(n - 1, math.ceil(fraction * n)) if fraction > 0 else 0
    order = np.random.default_rng([seed, 0x401D]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def stage2_views(
    config: DeltaConfig, images: np.ndarray, epoch: int, mean: Tensor, std: Tensor
) -> Tensor:
    """The normalized views (N, C, H, W) of uint8 NHWC ``images`` in stage-2 epoch ``epoch``:
    a fresh augmented view of every image (crop with black padding h/8, mirror if
    ``flip``), except for a residual released once (then the un-augmented images, whose
    residual it is). The release of the epoch and M_main's epoch use these same views, so
    each z_res is added to the z_main of its own input."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if config.augment and not (config.releases_residual and config.release == "once"):
        gen = epoch_generator(config.seed, 2, epoch, stream=2)
        x = augment_batch(x, gen, padding=max(1, images.shape[1] // 8), flip=config.flip)
    return (x - mean) / std


def payload_view(tensor: Tensor, config: DeltaConfig) -> Tensor:
    """The (B, c, h, w) tensor that leaves, or its (B, 1, h, w) mean over channels with
    ``payload="channel-mean"``."""
    return tensor.mean(1, keepdim=True) if config.payload == "channel-mean" else tensor


@torch.no_grad()
def leaving_split(model: PrivateModel, x: Tensor, config: DeltaConfig) -> tuple[Tensor, Tensor]:
    """(what the sanitizer gets, M_main's features) for images ``x``: the residual X - main
    (delta) or the whole IR X (naive-dp), through :func:`payload_view`, and the features of
    the same decomposition (empty for naive-dp, which decomposes nothing)."""
    if config.variant == "naive-dp":
        ir = model.ir(x)
        return payload_view(ir, config), ir.new_empty((len(ir), 0))
    split = model.decompose(x)
    return payload_view(split.residual, config), split.features


def build_original(config: DeltaConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The non-private baseline: M_bb followed by M_res, one network."""
    torch.manual_seed(config.seed)
    return original_model(
        config.public_arch,
        num_classes,
        in_channels=in_channels,
        ir_channels=config.ir_channels,
        width=config.public_width,
    )
