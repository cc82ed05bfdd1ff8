"""Turn raw image arrays into backbone input: one place for dtype, layout, channels, size and scale.

Every path into a backbone (episode streaming, `stamp prune`, the MLflow pyfunc, benchmarks) goes
through :func:`prepare_images`, so the pruner always sees pixels scaled the way it was trained on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Pixels in [0, 1] are mapped to [-1, 1]; grayscale and colour data share this scale.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


def prepare_images(
    images: np.ndarray | torch.Tensor,
    image_size: int,
    channels: int = 3,
) -> torch.Tensor:
    """Return a float32 ``(N, channels, image_size, image_size)`` tensor ready for a backbone.

    Args:
        images: uint8 pixels in ``[0, 255]`` or floats in ``[0, 1]``; layout ``(N, H, W)``,
            ``(N, H, W, C)`` (channels last, C in {1, 3}) or ``(N, C, H, W)``.
        image_size: side of the square output; images are resized bilinearly when it differs.
        channels: channels the backbone expects; grayscale is repeated to 3 channels.

    Raises:
        ValueError: empty input, unknown layout, non-finite pixels or floats outside ``[0, 1]``.
    """
    x = torch.as_tensor(images)
    if x.ndim > 0 and (x.numel() == 0 or x.shape[0] == 0):  # a 0-d scalar falls to the shape error
        raise ValueError("images is empty: expected at least one image of shape (H, W[, C])")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(
            f"images has shape {tuple(x.shape)}: expected (N, H, W), (N, H, W, C) or (N, C, H, W)"
        )
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images have {x.shape[1]} channels: expected 1 (grayscale) or 3 (RGB)")
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    elif x.is_floating_point():
        x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or inf pixels: expected finite values in [0, 1]")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(
                f"float images span [{lo:.3g}, {hi:.3g}]: expected [0, 1] (or uint8 in [0, 255])"
            )
    else:
        raise ValueError(f"images have dtype {x.dtype}: expected uint8 or a float type")
    if x.shape[1] != channels and x.shape[1] != 1:
        raise ValueError(f"images have {x.shape[1]} channels: the backbone expects {channels}")
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if x.shape[1] != channels:  # grayscale: repeat after resizing, a third of the work
        x = x.expand(-1, channels, -1, -1)
    return ((x - PIXEL_MEAN) / PIXEL_STD).contiguous()
