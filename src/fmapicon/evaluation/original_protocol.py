"""The original FeatureMapICON code's evaluation protocol (``protocol="original"``).

The centre square of each frame subsampled by 4 (``[::4]``), a hard nearest neighbour
(argmax of the dot product of unit features) in the first frame only, the first mask's
label at the matched cell (sampled at pixel offset 2), repeated 4 x 4; outside the centre
square the first mask is kept.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from fmapicon.evaluation.features import resize_maps
from fmapicon.data.images import to_tensor


def _centre_square(width: int, height: int) -> tuple[int, int]:
    """Columns ``[left, right)`` of the centre square (the whole width when not landscape)."""
    crop = (width - height) // 2 if width > height else 0
    return crop, width - crop


def _nearest_first_frame(query: torch.Tensor, keys: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Index of the best key (argmax dot product) for each query: ``N x C``, ``C x M`` -> N."""
    return torch.cat([(query[i:i + chunk] @ keys).argmax(dim=1) for i in range(0, len(query), chunk)])


def propagate_original(model, frames, first_ids, progress):
    """Object ids ``T x H x W`` of every frame and the timings, by the original code's protocol
    (the module docstring); ``progress`` counts frames."""
    height, width = frames.shape[1:3]
    left, right = _centre_square(width, height)
    small = frames[:, ::4, left:right:4]
    start = time.perf_counter()
    features = []
    for i in range(0, len(small)):
        image = to_tensor(small[i:i + 1], model.device)
        features.append(F.normalize(resize_maps(model(image), image.shape[-2:]), dim=1)[0])
        progress.update(1)
    feature_time = time.perf_counter() - start
    start = time.perf_counter()
    rows, cols = small.shape[1:3]
    # the first mask's label of each 1/4-scale cell, read at pixel offset 2 into the cell
    label_rows = np.minimum(np.arange(rows) * 4 + 2, height - 1)
    label_cols = np.minimum(left + np.arange(cols) * 4 + 2, right - 1)
    cell_labels = torch.from_numpy(first_ids[np.ix_(label_rows, label_cols)].reshape(-1).astype(np.int64))
    keys = features[0].reshape(features[0].shape[0], -1)
    ids = np.repeat(first_ids[None], len(frames), axis=0)
    for t in range(1, len(frames)):
        match = _nearest_first_frame(features[t].reshape(keys.shape[0], -1).t(), keys).cpu()
        small_ids = cell_labels[match].view(rows, cols).numpy().astype(np.uint8)
        full = np.repeat(np.repeat(small_ids, 4, axis=0), 4, axis=1)
        ids[t, :, left:right] = full[:height, : right - left]
        progress.update(1)
    return ids, {"features_s": feature_time, "propagation_s": time.perf_counter() - start}
