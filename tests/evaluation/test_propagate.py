"""Label propagation (CRW protocol): equality with the dense computation, oracle features,
the original protocol (the DAVIS harness: test_davis_eval.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmapicon.data.davis import annotation_paths, layout, read_annotation, write_indexed_png
from fmapicon.errors import UserError
from fmapicon.evaluation.davis_eval import evaluate_davis
from fmapicon.evaluation.features import FeatureModel
from fmapicon.evaluation.metrics import score_davis
from fmapicon.evaluation.local_affinity import scatter_rows
from fmapicon.evaluation.propagate import (LabelStream, PropagationParams, _key_users, context_slots,
                                           labels_to_ids, propagate_labels, propagate_sequence, soft_labels)


def dense_propagation(features, first_labels, context, radius, topk, temperature, restrict_first=False,
                      restarts=()):
    """The reference: for each frame the full affinity to every context key (first frame +
    the previous frames, padded with first-frame copies, or after a restart frame r with
    copies of r), radius-masked, top-k, softmax."""
    frames, channels, h, w = features.shape
    cells = torch.cartesian_prod(torch.arange(h), torch.arange(w)).float()
    near = torch.cdist(cells, cells) < radius                     # query x key
    labels = [first_labels]
    for t in range(1, frames):
        query = features[t].reshape(channels, -1).t()
        start = max([0] + [r for r in restarts if r < t])
        slots = [max(start, t - context + j) for j in range(context)]
        blocks, keys = [], []
        if not restrict_first:
            blocks.append(query @ features[0].reshape(channels, -1))
            keys.append(labels[0].reshape(len(first_labels), -1).t())
        for s in ([0] if restrict_first else []) + slots:
            blocks.append((query @ features[s].reshape(channels, -1)).masked_fill(~near, -math.inf))
            keys.append(labels[s].reshape(len(first_labels), -1).t())
        values, index = torch.cat(blocks, dim=1).topk(topk, dim=1)
        weights = torch.softmax(values / temperature, dim=1)
        labels.append((weights[..., None] * torch.cat(keys)[index]).sum(1).t().reshape(-1, h, w))
    return labels


def _random_sequence(frames=9, channels=16, h=13, w=19, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(frames, channels, h, w, generator=generator), dim=1)
    labels = torch.softmax(3 * torch.randn(classes, h, w, generator=generator), dim=0)
    return features, labels


def test_labels_to_ids_is_the_argmax_of_the_upsampled_labels_the_first_of_ties():
    generator = torch.Generator().manual_seed(5)
    labels = torch.softmax(torch.randn(5, 6, 9, generator=generator), dim=0)
    labels[3] = labels[1]                                   # ties: the first id wins, as argmax
    ids = labels_to_ids(labels, (25, 31))
    full = F.interpolate(labels[None], size=(25, 31), mode="bilinear", align_corners=False)[0]
    assert ids.dtype == np.uint8 and np.array_equal(ids, full.argmax(dim=0).numpy())
    assert set(np.unique(ids)) <= {0, 1, 2, 4} and 3 not in ids


def test_context_is_the_previous_frames_padded_with_the_first():
    assert context_slots(1, 3) == [0, 0, 0]
    assert context_slots(2, 3) == [0, 0, 1]
    assert context_slots(5, 3) == [2, 3, 4]
    assert _key_users(0, 3) == [(1, 3), (2, 2), (3, 1)]
    assert _key_users(2, 3) == [(3, 1), (4, 1), (5, 1)]


def test_a_restart_frame_takes_the_place_of_the_frames_before_it():
    assert context_slots(5, 3, restarts=[4]) == [4, 4, 4] and context_slots(6, 3, restarts=[4]) == [4, 4, 5]
    assert context_slots(8, 3, restarts=[4]) == [5, 6, 7] == context_slots(8, 3)
    assert _key_users(3, 3, restarts=[4]) == [(4, 1)]             # frames after 4 no longer see 3
    assert _key_users(4, 3, restarts=[4]) == [(5, 3), (6, 2), (7, 1)]


def test_streaming_with_restarts_equals_the_dense_result():
    features, first = _random_sequence(frames=16, h=9, w=11, seed=3)
    params = PropagationParams(context=4, radius=3, topk=5, temperature=0.1, tile=3)
    stream = LabelStream(features[0], first, params, restarts=[6, 7, 12])
    got = [first] + [labels for f in features[1:] for _, labels in stream.push(f)]
    got += [labels for _, labels in stream.close()]
    expected = dense_propagation(features, first, 4, 3, 5, 0.1, restarts=[6, 7, 12])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected, strict=True))
    plain = dense_propagation(features, first, 4, 3, 5, 0.1)
    assert not torch.allclose(got[-1], plain[-1], atol=1e-3)      # the restarts changed the result


def test_radius_covering_the_frame_equals_the_unrestricted_computation():
    features, first = _random_sequence()
    params = PropagationParams(context=4, radius=100, topk=7, temperature=0.1, tile=5)
    unrestricted = dense_propagation(features, first, 4, math.inf, 7, 0.1)
    for got, expected in zip(propagate_labels(features, first, params), unrestricted, strict=True):
        assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("radius, context, restrict_first, tile, topk", [
    (3, 4, False, 4, 5), (2.5, 3, True, 3, 7), (1, 2, False, 2, 3), (4, 20, False, 5, 10), (2, 1, True, 1, 1)])
def test_tiled_radius_equals_the_dense_masked_computation(radius, context, restrict_first, tile, topk):
    features, first = _random_sequence(seed=int(radius * 10) + context)
    params = PropagationParams(context=context, radius=radius, topk=topk, temperature=0.1,
                               restrict_first=restrict_first, tile=tile)
    expected = dense_propagation(features, first, context, radius, topk, 0.1, restrict_first)
    for got, reference in zip(propagate_labels(features, first, params), expected, strict=True):
        assert torch.allclose(got, reference, atol=1e-6)


def _oracle_features(masks: np.ndarray, stride: int, seed: int = 0) -> torch.Tensor:
    """Features that know the truth: the one-hot object id, cell-averaged, plus a small
    per-pixel random term (so that ties and positions are not free), L2-normalized."""
    ids = torch.from_numpy(masks.astype(np.int64))
    onehot = F.one_hot(ids, int(ids.max()) + 1).permute(0, 3, 1, 2).float()
    cells = F.avg_pool2d(onehot, stride, ceil_mode=True)
    noise = torch.randn(cells.shape[0], 8, *cells.shape[-2:], generator=torch.Generator().manual_seed(seed))
    return F.normalize(torch.cat([cells, 0.05 * noise], dim=1), dim=1)


def test_oracle_features_score_near_one(synth_root, tmp_path):
    params = PropagationParams(stride=4)
    _, annotations = layout(synth_root)
    names = [p.name for p in sorted(annotations.iterdir())]
    for name in names:
        paths = annotation_paths(annotations, name)
        masks = np.stack([read_annotation(p) for p in paths])
        features = _oracle_features(masks, params.stride)
        first = soft_labels(masks[0], features.shape[-2:])
        for path, labels in zip(paths, propagate_labels(features, first, params), strict=True):
            write_indexed_png(tmp_path / name / path.name, labels_to_ids(labels, masks.shape[1:]))
    result = score_davis(synth_root, tmp_path, progress=False)
    assert result["jf_mean"] > 0.9, result["global"]


class _PixelCode(torch.nn.Module):
    """A fixed random 1 x 1 convolution: unique features for noise images."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 1)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.conv(x)


def test_original_protocol_matches_each_cell_to_itself():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(40, 64, 3), dtype=np.uint8)
    frames = np.repeat(frame[None], 3, axis=0)              # the video never moves
    first = np.zeros((40, 64), np.uint8)
    first[10:30, 20:50] = 1
    first[:, :12] = 2                                       # left of the centre square
    model = FeatureModel(_PixelCode(), stride=1, name="code")
    ids, timings = propagate_sequence(model, frames, first, PropagationParams(protocol="original"), progress=False)
    # centre square: columns 12..52; each 4 x 4 cell takes the first mask at its offset (2, 2)
    expected = first.copy()
    expected[:, 12:52] = np.repeat(np.repeat(first[2::4, 14:52:4], 4, axis=0), 4, axis=1)
    assert np.array_equal(ids[0], first)
    assert np.array_equal(ids[1], expected) and np.array_equal(ids[2], expected)
    assert set(timings) == {"features_s", "propagation_s"}


class _Constant(torch.nn.Module):
    """The same feature everywhere: every affinity ties."""

    def forward(self, x):
        return torch.ones(x.shape[0], 4, *x.shape[-2:], dtype=x.dtype)


def test_pixels_weight_fuses_the_pixels_affinity_into_the_models():
    from fmapicon.evaluation.features import pixels_model

    rng = np.random.default_rng(4)
    scene = rng.integers(0, 256, size=(48, 96, 3), dtype=np.uint8)
    frames = np.stack([np.roll(scene, 3 * t, axis=1)[:, :64] for t in range(5)])   # a texture sliding right
    first = np.zeros((48, 64), np.uint8)
    first[8:40, 16:40] = 1
    constant = FeatureModel(_Constant(), stride=1, name="constant")
    # with a constant model, 0.5 cos(model) + 0.5 cos(pixels) = 0.5 + 0.5 cos(pixels): the same
    # top-k as pixels alone, and the softmax of pixels at twice the temperature
    fused, _ = propagate_sequence(constant, frames, first, PropagationParams(stride=4, pixels_weight=0.5),
                                  progress=False)
    alone, _ = propagate_sequence(pixels_model(4), frames, first, PropagationParams(stride=4, temperature=0.1),
                                  progress=False)
    blind, _ = propagate_sequence(constant, frames, first, PropagationParams(stride=4), progress=False)
    assert np.mean(fused == alone) > 0.999
    assert np.mean(fused != blind) > 0.01                   # the knob changed the result


def test_copy_repeats_the_first_mask_without_void():
    first = np.array([[0, 1], [255, 2]], np.uint8)
    ids, _ = propagate_sequence(None, np.zeros((3, 2, 2, 3), np.uint8), first, PropagationParams(protocol="copy"),
                                progress=False)
    assert ids.tolist() == [[[0, 1], [0, 2]]] * 3


def test_bad_parameters_and_roots_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="radius must be > 0"):
        PropagationParams(radius=0).checked()
    with pytest.raises(UserError, match="protocol must be one of"):
        PropagationParams(protocol="dino").checked()
    with pytest.raises(UserError, match="use --model pixels"):
        PropagationParams(pixels_weight=1).checked()
    with pytest.raises(UserError, match="not of 'original'"):
        PropagationParams(protocol="original", pixels_weight=0.5).checked()
    with pytest.raises(UserError, match="JPEGImages"):
        evaluate_davis("copy", tmp_path, tmp_path / "out", progress=False)


def test_window_candidates_hold_every_entry_above_the_floor_of_the_radius_top_k():
    from fmapicon.evaluation.local_affinity import Tiles, window_candidates

    features, _ = _random_sequence(frames=4, h=11, w=14, seed=3)
    tiles = Tiles((11, 14), 3.5, 4, "cpu")
    queries, keys = tiles.arrange(features[1:]), tiles.pad_keys(features[:1])[0]
    cells = torch.cartesian_prod(torch.arange(11), torch.arange(14)).float()
    near = torch.cdist(cells, cells) < 3.5
    dense = (features[1:].flatten(2).transpose(1, 2) @ features[0].flatten(1)).masked_fill(~near, -math.inf)
    top = dense.topk(6, dim=-1).values                                   # 3 x hw x 6
    floor = top[..., 2] - 0.01 * torch.rand(top.shape[:2], generator=torch.Generator().manual_seed(0))
    # the floor per query in tile order; the padding cells of the tiles get 10 (nothing passes)
    floor_tiles = tiles.arrange(floor.view(3, 1, 11, 14)).permute(2, 0, 1, 3, 4).reshape(3, -1)
    pad = tiles.arrange(torch.ones(1, 1, 11, 14)).reshape(-1) == 0
    floor_tiles[:, pad] = 10.0
    user, query, values, key = window_candidates(tiles, queries, keys, 6, floor_tiles)
    cell_of = tiles.arrange(torch.arange(11 * 14).float().view(1, 1, 11, 14)).reshape(-1).long()
    got = {}
    for u, q, v, k in zip(user.tolist(), query.tolist(), values.tolist(), key.tolist()):
        got.setdefault((u, cell_of[q].item()), []).append((k, v))
    for u in range(3):
        for q in range(11 * 14):
            expected = sorted(v for v in top[u, q].tolist() if v > floor[u, q])
            found = got.get((u, q), [])
            assert sorted(v for _, v in found) == pytest.approx(expected, abs=1e-6)
            for k, v in found:          # the key index names the padded cell whose affinity it is
                y, x = divmod(k, tiles.padded[1])
                assert dense[u, q, (y - tiles.m) * 14 + x - tiles.m].item() == pytest.approx(v, abs=1e-6)


def test_streaming_holds_a_bounded_number_of_frames_and_equals_the_dense_result():
    features, first = _random_sequence(frames=40, h=7, w=9, seed=5)
    params = PropagationParams(context=3, radius=2.5, topk=4, temperature=0.1, tile=3)
    stream = LabelStream(features[0], first, params)
    got = [first] + [labels for f in features[1:] for _, labels in stream.push(f)]
    assert len(got) == 40 - params.context + 1 and stream.retained == params.context + 1
    # the near floor's key maps and motions: of the next query frame's near frames only
    assert sorted(stream.near_keys) == [37, 38, 39] and sorted(stream.motion) == [37, 38, 39]
    got += [labels for _, labels in stream.close()]
    assert stream.peak_retained == params.context + 2     # frame 0, the next key, the context's queries
    expected = dense_propagation(features, first, 3, 2.5, 4, 0.1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected, strict=True))


# --------------------------------------------------------------------------- sparse, short, output folder


def test_near_floor_is_the_k_th_best_within_the_moved_windows():
    from fmapicon.evaluation.local_affinity import NearFloor, Tiles

    features, _ = _random_sequence(frames=3, h=11, w=14, seed=7)
    tiles = Tiles((11, 14), 6.0, 4, "cpu")
    near = NearFloor(tiles, 2.5, 2)
    assert near.reach == 3 and near.clamp((5.2, -0.6)) == (3, -1)
    queries = tiles.arrange(features[2:])[:, :, 0]
    cells = torch.cartesian_prod(torch.arange(11), torch.arange(14)).float()
    key_minus_query = cells[None, :] - cells[:, None]                                  # q x k x 2
    on = tiles.on_grid
    for shifts in [((0, 0), (0, 0)), ((2, -3), (0, 1)), ((3, 3), (-3, 2))]:
        frames = [(i, near.key_map(tiles.pad_keys(features[i:i + 1])[0]), d) for i, d in zip((0, 1), shifts)]
        floor, _ = near.floor(queries, frames, 6)
        dense = []
        for i, d in zip((0, 1), shifts):
            kept = ((key_minus_query - torch.tensor(d)) ** 2).sum(-1) < 2.5**2
            kept &= (key_minus_query**2).sum(-1) < 6.0**2                               # within the full radius
            dense.append((features[2].flatten(1).t() @ features[i].flatten(1)).masked_fill(~kept, -math.inf))
        kth = tiles.arrange(torch.cat(dense, dim=1).topk(6, dim=1).values[:, -1].view(1, 1, 11, 14)).reshape(-1)
        assert torch.allclose(floor[on], kth[on].clamp(min=-1.0), atol=1e-6)
        # -1 (the least cosine: no pruning) where fewer than k keys lie on the frame
        assert (kth[on] == -math.inf).any() == (shifts[0] == (3, 3))


def test_the_near_floor_follows_a_pan_and_keeps_the_dense_result():
    # a scene panning 1 cell a frame: frame t shows scene column x + t at column x, so a
    # query's content lies j cells to its right j frames before (the near windows, radius 4,
    # reach the 4 latest only if they move; radius 7 leaves them room)
    generator = torch.Generator().manual_seed(13)
    scene = torch.randn(1, 16, 15, 40, generator=generator)
    frames = torch.cat([scene[..., t: t + 24] for t in range(12)])
    features = F.normalize(frames + 0.3 * torch.randn(frames.shape, generator=generator), dim=1)
    first = torch.softmax(3 * torch.randn(3, 15, 24, generator=generator), dim=0)
    params = PropagationParams(context=5, radius=7, topk=4, temperature=0.1, tile=4)
    runs = {}
    for still in (False, True):
        stream = LabelStream(features[0], first, params)
        if still:                                     # windows that do not move
            stream.near.clamp = lambda shift: (0, 0)
        got, floors, motion = [first], [], []
        for t, f in enumerate(features[1:], 1):
            got += [labels for _, labels in stream.push(f)]
            floors.append(stream.seed_floor(t)[stream.tiles.on_grid])
            motion.append(stream.motion[t][1])
        runs[still] = got + [labels for _, labels in stream.close()], torch.cat(floors), motion, stream.near.gathered
    got, floors, motion, gathered = runs[False]
    assert motion == list(range(1, 12))
    # a frame's windows are gathered once while they stay put (frames 0-10), again when they move
    assert runs[True][3] == 11 and gathered > 11
    assert floors.median() > runs[True][1].median() + 0.2       # the moved windows hold 4 matches, else 3
    expected = dense_propagation(features, first, 5, 7, 4, 0.1)
    for labels in (got, runs[True][0]):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(labels, expected, strict=True))


def test_near_floor_measures_the_global_motion_of_a_pan():
    from fmapicon.evaluation.local_affinity import NearFloor, Tiles

    features, _ = _random_sequence(frames=1, h=15, w=18, seed=3)
    panned = torch.roll(features, shifts=(2, -1), dims=(2, 3))     # content at q now at q + (2, -1)
    tiles = Tiles((15, 18), 6.0, 4, "cpu")
    near = NearFloor(tiles, 4.0, 1)
    queries = tiles.arrange(features)[:, :, 0]
    keys = near.key_map(tiles.pad_keys(panned)[0])
    for guess in [(0, 0), (1, 0), (2, -2), (-1, 1)]:      # the motion within 4 cells of the guess
        assert near.floor(queries, [(0, keys, guess)], 4)[1] == (2, -1)


def test_near_ties_at_the_floor_keep_the_dense_result():
    # nearly static features: every query's best keys, in every frame, lie within about
    # 1e-5 of each other, so the floor drawn from the recent frames sits among near ties
    # of the entries the full products find again, computed by another kernel
    generator = torch.Generator().manual_seed(11)
    base = torch.randn(1, 16, 9, 12, generator=generator)
    features = F.normalize(base + 2e-3 * torch.randn(14, 16, 9, 12, generator=generator), dim=1)
    first = torch.softmax(3 * torch.randn(3, 9, 12, generator=generator), dim=0)
    params = PropagationParams(context=10, radius=3, topk=6, temperature=0.1, tile=3)
    stream = LabelStream(features[0], first, params)
    cells = torch.cartesian_prod(torch.arange(9), torch.arange(12)).float()
    near = torch.cdist(cells, cells) < 3
    for t in range(1, 14):
        stream.push(features[t])
        query = features[t].flatten(1).t()
        blocks = [query @ features[0].flatten(1)] + [(query @ features[s].flatten(1)).masked_fill(~near, -math.inf)
                                                     for s in context_slots(t, 10)]
        kth = torch.cat(blocks, dim=1).topk(6, dim=1).values[:, -1]
        floor = stream.tiles.to_grid(stream.seed_floor(t)[:, None]).reshape(-1)
        assert (floor <= kth).all()                         # safe: nothing of the top-k is pruned
        if t > 8:                                           # 8 recent frames: the floor is among near ties
            assert ((kth - floor) < 1e-4).float().mean() > 0.9, (kth - floor).max()
    got = list(propagate_labels(features, first, params))
    expected = dense_propagation(features, first, 10, 3, 6, 0.1)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected, strict=True))


# --------------------------------------------------------------------------- speed paths, same result


def test_first_frame_searches_agree_with_a_full_row_top_k():
    from fmapicon.evaluation.local_affinity import FrameSearch, first_frame_topk

    generator = torch.Generator().manual_seed(13)
    h, w, channels = 9, 16, 70
    keys = F.normalize(torch.randn(channels, h * w, generator=generator), dim=0)
    queries = F.normalize(torch.randn(40, channels, generator=generator), dim=1)
    queries[:10] = F.normalize(keys[:, :10].t() + 1e-3 * torch.randn(10, channels, generator=generator), dim=1)
    keys[:, 100:130] = keys[:, 100:101]                       # crowded: 31 equal keys, more than k pass
    queries[10] = keys[:, 100]
    full = queries @ keys
    values, cells = full.topk(6, dim=-1)
    rows = keys.t().contiguous()
    got_values, got_cells = first_frame_topk(queries, rows, 6, segment=w)
    assert torch.equal(got_values, values)
    assert torch.equal(torch.gather(full, 1, got_cells), values)
    floor = values[:, 3] - 1e-4 * torch.rand(40, generator=generator)      # some rows: only 4 pass
    floor[20:] = values[20:, -1] - 0.05                                      # others: more than k
    floor[36:] = -0.5                                # not positive: bf16 scores compared as floats
    expected = values.masked_fill(values <= floor[:, None], -math.inf)
    for coarse in ("low-rank", "bf16", "int8"):
        search = FrameSearch(rows, h, coarse, rank=8)
        assert sorted(search.order.tolist()) == list(range(h * w))          # a permutation of the cells
        above, where = search.above(queries, floor, 6)
        assert torch.allclose(above.sort(dim=-1).values, expected.sort(dim=-1).values, atol=1e-6)   # any order
        found = torch.isfinite(above)
        assert torch.allclose(torch.gather(full, 1, where)[found], above[found], atol=1e-6)
        nothing, _ = search.above(queries, torch.full((40,), 2.0), 6)    # none can pass
        assert nothing.shape == (40, 6) and torch.isinf(nothing).all()


def test_the_low_rank_bound_of_the_frame_search_holds_and_prunes():
    from fmapicon.evaluation.local_affinity import FrameSearch

    generator = torch.Generator().manual_seed(17)
    # keys near a few directions, as features are: most of their energy in a low-rank part
    centres = F.normalize(torch.randn(6, 70, generator=generator), dim=1)
    keys = F.normalize(centres[torch.arange(120) % 6] + 0.03 * torch.randn(120, 70, generator=generator), dim=1)
    queries = F.normalize(centres[torch.arange(30) % 6] + 0.03 * torch.randn(30, 70, generator=generator), dim=1)
    search = FrameSearch(keys, 12, "low-rank", rank=8)
    bound = search._low_rank(queries) @ search.low_keys                    # Nq x hw, in sorted order
    exact = queries @ search.keys.t()
    assert (bound >= exact - 1e-6).all()                                   # an upper bound everywhere
    segment_bound = bound.view(30, 12, 10).amax(-1)
    kth = exact.topk(5, dim=-1).values[:, -1]
    assert (segment_bound < kth[:, None]).float().mean() > 0.5             # most segments need no product


def test_each_coarse_search_of_frame_0_gives_the_dense_result(monkeypatch):
    import fmapicon.evaluation.propagate as propagate

    features, first = _random_sequence(frames=8, channels=80, h=9, w=12, seed=21)
    params = PropagationParams(context=3, radius=3, topk=5, temperature=0.1, tile=4)
    for coarse in ("low-rank", "bf16", "int8"):
        monkeypatch.setattr(propagate, "bf16_is_faster", lambda device, fast=coarse != "low-rank": fast)
        monkeypatch.setattr(propagate, "int8_is_faster", lambda device, fast=coarse == "int8": fast)
        stream = LabelStream(features[0], first, params)
        assert stream.first_search.coarse == coarse
        got = [first] + [labels for f in features[1:] for _, labels in stream.push(f)]
        got += [labels for _, labels in stream.close()]
        expected = dense_propagation(features, first, 3, 3, 5, 0.1)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected, strict=True))


def _moving_scene(frames=10, channels=80, h=12, w=15, seed=0):
    """Unit features of a smooth random field seen through a window that moves one cell a
    frame (plus a little noise): each query's best keys are few and clear, as in video."""
    generator = torch.Generator().manual_seed(seed)
    field = F.avg_pool2d(torch.randn(1, channels, h + frames + 4, w + frames + 4, generator=generator), 3, 1, 1)
    maps = [field[0, :, t: t + h, t // 2: t // 2 + w] for t in range(frames)]
    noise = 0.02 * torch.randn(frames, channels, h, w, generator=generator)
    return F.normalize(torch.stack(maps) + noise, dim=1)


def _count_sampled(monkeypatch) -> list:
    """Record the number of entries each ``sampled_product`` call scores."""
    import fmapicon.evaluation.local_affinity as local_affinity

    counts, sampled = [], local_affinity.sampled_product
    monkeypatch.setattr(local_affinity, "sampled_product",
                        lambda rows, columns, line, col: counts.append(len(line)) or sampled(rows, columns, line, col))
    return counts


def test_running_top_k_holds_the_k_best_of_everything_merged_copies_counted():
    from fmapicon.evaluation.local_affinity import RunningTopK

    generator = torch.Generator().manual_seed(2)
    frames, cells, k, offset, copies = 3, 40, 5, 1000, [1, 3, 1]
    start = torch.rand(frames, cells, k, generator=generator)
    start[0, :7] = -math.inf                                      # rows that hold fewer than k yet
    values, index = start.clone(), torch.arange(frames * cells * k).view(frames, cells, k)
    running = RunningTopK(values, index, copies, offset)
    merged = [(u, q, float(start[u, q, j]), int(index[u, q, j])) for u in range(frames) for q in range(cells)
              for j in range(k)]
    for block in (slice(0, 24), slice(24, 40), slice(0, 24)):       # disjoint cells within a key frame
        n = 30
        user = torch.randint(0, frames, (n,), generator=generator)
        query = torch.randint(block.start, block.stop, (n,), generator=generator)
        value, key = torch.rand(n, generator=generator), torch.randint(0, 500, (n,), generator=generator)
        running.merge(block, user, query, value, key)
        merged += [(int(u), int(q), float(v), int(c) + offset) for u, q, v, c in zip(user, query, value, key)
                   for _ in range(copies[int(u)])]
    for u in range(frames):
        for q in range(cells):
            best = sorted((v, c) for uu, qq, v, c in merged if (uu, qq) == (u, q))[::-1][:k]
            assert sorted(values[u, q].tolist(), reverse=True) == pytest.approx([v for v, _ in best])
            kept = [c for v, c in best if v > -math.inf]
            assert sorted(index[u, q, : len(kept)].tolist()) == sorted(kept)
    assert torch.equal(running.kth(slice(3, 9)), values[:, 3:9].amin(dim=-1))


def test_the_running_k_th_best_prunes_the_windows():
    from fmapicon.evaluation.local_affinity import RunningTopK, Tiles, window_candidates

    features = _moving_scene(frames=4)
    tiles = Tiles((12, 15), 6, 4, "cpu")
    queries, keys = tiles.arrange(features[1:]), tiles.pad_keys(features[:1])[0]
    floor = torch.full((3, tiles.cells), -1.0)
    found = window_candidates(tiles, queries, keys, 5, floor)
    values = torch.full((3, tiles.cells, 5), -math.inf)
    index = torch.zeros(3, tiles.cells, 5, dtype=torch.long)
    assert window_candidates(tiles, queries, keys, 5, floor, running=RunningTopK(values, index)) is None
    top = scatter_rows(found[0] * tiles.cells + found[1], found[2], found[3], 3 * tiles.cells, 5)[0]
    assert torch.equal(values.view(-1, 5), top.sort(dim=-1, descending=True).values)      # merged, not returned
    # a running k-th best above every affinity: nothing passes
    running, sizes = RunningTopK(torch.full((3, tiles.cells, 5), 2.0), index.clone()), []
    merge = running.merge
    running.merge = lambda cells, user, *rest: sizes.append(len(user)) or merge(cells, user, *rest)
    window_candidates(tiles, queries, keys, 5, floor, running=running)
    assert len(sizes) > 1 and sum(sizes) == 0 and (running.values == 2.0).all()


def test_sampled_product_gives_the_entries_of_the_full_product():
    from fmapicon.evaluation.local_affinity import sampled_product

    generator = torch.Generator().manual_seed(2)
    rows, columns = torch.randn(30, 12, generator=generator), torch.randn(40, 12, generator=generator).t()
    line = torch.sort(torch.randint(0, 30, (200,), generator=generator)).values
    col = torch.randint(0, 40, (200,), generator=generator)
    order = torch.argsort(line * 40 + col)
    line, col = line[order], col[order]
    assert torch.allclose(sampled_product(rows, columns, line, col), (rows @ columns)[line, col], atol=1e-5)
    assert sampled_product(rows, columns.contiguous(), line[:0], col[:0]).shape == (0,)


def test_bf16_bits_below_keep_every_larger_bf16_number_above_them():
    from fmapicon.evaluation.local_affinity import _bf16_bits_below

    generator = torch.Generator().manual_seed(4)
    floors = torch.rand(2000, generator=generator) + 1e-3
    bits = _bf16_bits_below(floors)
    assert (bits.view(torch.bfloat16).float() <= floors).all()          # at or below
    numbers = torch.randn(2000, 50, generator=generator).to(torch.bfloat16)
    above = numbers.float() > floors[:, None]
    assert torch.equal(above & (numbers.view(torch.int16) > bits[:, None]), above)     # none lost
    assert ((numbers.view(torch.int16) > bits[:, None]) & ~above).sum() <= 0.01 * above.sum()   # few more


def test_coarse_bf16_windows_give_the_float32_candidates(monkeypatch):
    import fmapicon.evaluation.local_affinity as local_affinity
    from fmapicon.evaluation.local_affinity import Tiles, bf16_copy, window_candidates

    features = _moving_scene(frames=5)
    tiles = Tiles((12, 15), 6, 4, "cpu")
    queries, keys = tiles.arrange(features[1:]), tiles.pad_keys(features[:1])[0]
    low_keys, key_rounding = bf16_copy(keys, dim=0)
    coarse = (*bf16_copy(queries), low_keys, key_rounding.max())
    exact = window_candidates(tiles, queries, keys, 8, None)              # every query's top 8
    top = local_affinity.scatter_rows(exact[0] * tiles.cells + exact[1], exact[2], exact[3], 4 * tiles.cells, 8)[0]
    top = top.sort(dim=-1, descending=True).values.clamp(min=0.05)
    counts = _count_sampled(monkeypatch)
    for name, floor in (("3rd best", top[:, 2] - 1e-4), ("8th best: more than k pass", top[:, 7] - 1e-4),
                        ("low, positive", torch.full_like(top[:, 0], 0.02)), ("negative", top[:, 0] - 2)):
        floor = torch.where(torch.isfinite(floor), floor, torch.tensor(2.0)).view(4, -1)   # padding cells: none
        counts.clear()
        expected = window_candidates(tiles, queries, keys, 5, floor)
        got = window_candidates(tiles, queries, keys, 5, floor, coarse)
        pairs = lambda found: {(u, q, k): v for u, q, v, k in zip(*(x.tolist() for x in found))}
        assert pairs(got).keys() == pairs(expected).keys(), name
        assert all(abs(pairs(got)[x] - v) < 1e-6 for x, v in pairs(expected).items()), name
        if "best" in name:                                      # found by bf16, scored again in float32
            assert sum(counts) >= len(expected[0]) and sum(counts) < 0.1 * tiles.cells * 4 * tiles.side**2
        else:                     # most pass, or the floor is not positive: float32 products only
            assert counts == [], name
        per_query = torch.bincount(got[0] * tiles.cells + got[1])
        assert per_query.max() == (5 if "8th" in name else per_query.max()) and per_query.max() <= 5


def test_the_rounded_product_error_bounds_the_product_of_the_rounded_vectors():
    from fmapicon.evaluation.local_affinity import BF16_OUTPUT_ERROR, bf16_copy, int8_copy, rounded_product_error

    def deviation_and_bound(queries, keys):
        (low_queries, query_rounding), (low_keys, key_rounding) = bf16_copy(queries), bf16_copy(keys)
        assert torch.allclose(query_rounding, (low_queries.double() - queries.double()).norm(dim=1).float())
        # the bf16 product before its own rounding: exact sums of the rounded vectors' products
        deviation = (low_queries.double() @ low_keys.double().t() - queries.double() @ keys.double().t()).abs()
        return deviation, rounded_product_error(query_rounding, key_rounding.max(), 91).double(), key_rounding

    generator = torch.Generator().manual_seed(6)
    unit = lambda n: F.normalize(torch.randn(n, 91, generator=generator), dim=1)
    queries, keys = unit(300), unit(400)
    keys[:200] = F.normalize(queries[:200] + 0.1 * torch.randn(200, 91, generator=generator), dim=1)  # near 1 too
    deviation, bound, _ = deviation_and_bound(queries, keys)
    assert (deviation <= bound[:, None]).all() and bound.max() < 0.006      # the worst case of any: 0.0078
    rounded = (queries.bfloat16() @ keys.bfloat16().t()).double()            # the result rounded to bf16 too
    assert ((rounded - queries.bfloat16().double() @ keys.bfloat16().double().t()).abs() <= BF16_OUTPUT_ERROR).all()

    # each term is needed: keys exact in bf16 along the queries' rounding, then queries exact in
    # bf16 along the keys' rounding, make the deviation reach the query's or the key's term
    queries = unit(100)
    along = lambda x: (0.99 * F.normalize(x.bfloat16().float() - x, dim=1)).bfloat16().float()   # norm < 1
    deviation, bound, _ = deviation_and_bound(queries, along(queries))
    assert (deviation <= bound[:, None]).all() and (deviation.diagonal() > 0.9 * bound).all()
    keys = unit(100)
    deviation, bound, key_rounding = deviation_and_bound(along(keys), keys)
    assert (deviation <= bound[:, None]).all() and (deviation.diagonal() > 0.9 * key_rounding.double()).all()

    # int8 copies (a scale per query, one for the keys): exact integer sums, the same bound
    queries, keys = unit(300), unit(400)
    (low_queries, query_rounding, query_scale) = int8_copy(queries)
    (low_keys, key_rounding, key_scale) = int8_copy(keys, per_vector=False)
    assert low_keys.dtype == torch.int8 and low_keys.abs().max() == 127 and query_scale.shape == (300,)
    rounding = (low_queries.double() / query_scale[:, None] - queries.double()).norm(dim=1)
    assert torch.allclose(query_rounding.double(), rounding) and (rounding <= 91**0.5 / (2 * query_scale)).all()
    sums = torch._int_mm(low_queries, low_keys.t().contiguous())
    assert torch.equal(sums.long(), low_queries.long() @ low_keys.long().t())
    deviation = (sums.double() / (query_scale[:, None] * key_scale) - queries.double() @ keys.double().t()).abs()
    bound = rounded_product_error(query_rounding, key_rounding.max(), 91).double()
    assert (deviation <= bound[:, None]).all() and deviation.max() > 0.1 * bound.max()


def test_a_bf16_product_that_rounds_down_to_the_threshold_still_passes():
    from fmapicon.evaluation.local_affinity import FrameSearch, Tiles, bf16_copy, window_candidates

    # vectors exact in bf16 (no rounding error): the bf16 product before its rounding is
    # 0.75 + 2^-10, above a floor just below it; rounded, it is 0.75, the largest bf16 at or
    # below the lowered floor: kept only if "at or above" is what is compared
    query = torch.zeros(64)
    query[:4] = 0.5
    keys = torch.zeros(128, 64)
    keys[:, 4:] = 0.1 * torch.eye(60).repeat(3, 1)[:128]           # other keys: 0 with the query
    keys[37, :4] = torch.tensor([0.5, 0.5, 0.5, 2.0**-9])
    value = 0.75 + 2.0**-10
    floor = torch.tensor([value - 1e-6])
    search = FrameSearch(keys, 2, "bf16")
    found, cells = search.above(query[None], floor, 3)
    assert found[0].tolist().count(value) == 1 and cells[0][found[0] == value].tolist() == [37]

    tiles = Tiles((4, 8), 2, 4, "cpu")                                # the windows: the same rule
    features = keys[:32].t().reshape(1, 64, 4, 8).clone()
    features[0, :, 0, 5] = keys[37]                                     # the key at cell (0, 5)
    queries = tiles.arrange(query.view(1, 64, 1, 1).expand(1, 64, 4, 8).contiguous())
    padded = tiles.pad_keys(features)[0]
    low_keys, key_rounding = bf16_copy(padded, dim=0)
    floors = torch.full((1, tiles.cells), 2.0)                          # no entries but...
    at = tiles.arrange(torch.arange(32.0).view(1, 1, 4, 8)).reshape(-1) == 5
    floors[0, at] = value - 1e-6                                        # ...the query at (0, 5)'s
    user, where, values, key = window_candidates(tiles, queries, padded, 3, floors,
                                                 (*bf16_copy(queries), low_keys, key_rounding.max()))
    assert values.tolist() == [value] and at[where].all()


def test_the_coarse_windows_of_a_stream_give_the_dense_result(monkeypatch):
    import fmapicon.evaluation.propagate as propagate

    features = _moving_scene(frames=12)
    first = torch.softmax(3 * torch.randn(3, 12, 15, generator=torch.Generator().manual_seed(1)), dim=0)
    params = PropagationParams(context=4, radius=4, topk=5, temperature=0.1, tile=4)
    monkeypatch.setattr(propagate, "bf16_is_faster", lambda device: True)
    monkeypatch.setattr(propagate, "int8_is_faster", lambda device: False)
    counts = _count_sampled(monkeypatch)
    stream = LabelStream(features[0], first, params)
    assert stream.coarse is not None and stream.first_search.coarse == "bf16"
    got = [first] + [labels for f in features[1:] for _, labels in stream.push(f)]
    got += [labels for _, labels in stream.close()]
    assert sum(counts) > 0 and stream.coarse[2].keys() == stream.keys.keys()     # bf16 copies dropped with them
    expected = dense_propagation(features, first, 4, 4, 5, 0.1)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected, strict=True))


def test_parallel_map_keeps_order_and_runs_blocks_on_several_threads():
    import threading

    from fmapicon.evaluation.local_affinity import parallel_map

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = set()

        def work(i):
            seen.add(threading.get_ident())
            assert not torch.is_grad_enabled()
            return torch.full((2,), float(i)).matmul(torch.ones(2))

        assert [x.item() for x in parallel_map(work, range(40), "cpu")] == [2.0 * i for i in range(40)]
        torch.set_num_threads(1)
        assert [x.item() for x in parallel_map(lambda i: torch.tensor(i), range(3), "cpu")] == [0, 1, 2]
    finally:
        torch.set_num_threads(before)
