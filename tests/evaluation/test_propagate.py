"""Label propagation (CRW protocol): equality with the dense computation, oracle features,
the original protocol, and DAVIS evaluation end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmapicon.data.davis import annotation_paths, frame_paths, layout, read_annotation, write_indexed_png
from fmapicon.errors import UserError
from fmapicon.evaluation.features import FeatureModel
from fmapicon.evaluation.metrics import score_davis
from fmapicon.evaluation.propagate import (PropagationParams, _key_users, context_slots, evaluate_davis, labels_to_ids,
                                propagate_labels, propagate_sequence, soft_labels)


def dense_propagation(features, first_labels, context, radius, topk, temperature, restrict_first=False):
    """The reference: for each frame the full affinity to every context key (first frame +
    the previous frames, padded with first-frame copies), radius-masked, top-k, softmax."""
    frames, channels, h, w = features.shape
    cells = torch.cartesian_prod(torch.arange(h), torch.arange(w)).float()
    near = torch.cdist(cells, cells) < radius                     # query x key
    labels = [first_labels]
    for t in range(1, frames):
        query = features[t].reshape(channels, -1).t()
        slots = [max(0, t - context + j) for j in range(context)]
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


def test_context_is_the_previous_frames_padded_with_the_first():
    assert context_slots(1, 3) == [0, 0, 0]
    assert context_slots(2, 3) == [0, 0, 1]
    assert context_slots(5, 3) == [2, 3, 4]
    assert _key_users(0, 6, PropagationParams(context=3)) == [(1, 3), (2, 2), (3, 1)]
    assert _key_users(2, 6, PropagationParams(context=3)) == [(3, 1), (4, 1), (5, 1)]
    assert _key_users(0, 4, PropagationParams(context=2, restrict_first=True)) == [(1, 3), (2, 2), (3, 1)]


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
    with pytest.raises(UserError, match="JPEGImages"):
        evaluate_davis("copy", tmp_path, tmp_path / "out", progress=False)


def test_evaluate_writes_predictions_scores_and_the_protocol(synth_root, tmp_path):
    params = PropagationParams(stride=8, context=5, radius=6)
    result = evaluate_davis("pixels", synth_root, tmp_path, params=params, progress=False)
    images, annotations = layout(synth_root)
    for name in result["sequences"]:
        written = sorted(p.name for p in (tmp_path / name).glob("*.png"))
        assert written == [p.stem + ".png" for p in frame_paths(images, name)]
        first = read_annotation(annotation_paths(annotations, name)[0])
        assert np.array_equal(read_annotation(tmp_path / name / "00000.png"), first)
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["protocol"] == "crw" and record["params"]["radius"] == 6 and record["params"]["topk"] == 10
    assert record["input_scale"] == 1.0 and record["model"].startswith("pixels")
    assert set(record["timings"][result["sequences"][0]]) >= {"frames", "features_s", "propagation_s"}
    assert (tmp_path / "global_results-val.csv").is_file() and (tmp_path / "per-sequence_results-val.csv").is_file()
    assert 0 < record["jf_mean"] <= 1 and record["jf_mean"] == result["jf_mean"]


def test_cli_eval_copy(synth_root, tmp_path, capsys):
    from fmapicon.cli import main

    assert main(["eval", "--davis", str(synth_root), "--model", "copy", "--out", str(tmp_path / "e"),
                 "--device", "cpu"]) == 0
    assert "Global results for val" in capsys.readouterr().out
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["protocol"] == "copy"
    assert main(["eval", "--davis", str(tmp_path / "e"), "--model", "copy", "--out", str(tmp_path / "f")]) == 2


@pytest.mark.slow
def test_pixels_beat_copy_on_a_real_sequence(davis2016_root, tmp_path):
    """Real DAVIS frames (dog-agility, 25 frames 854 x 480): Lab patches propagated with the
    CRW protocol follow the dog; copying the first mask does not (measured 0.50 vs 0.13)."""
    copy = evaluate_davis("copy", davis2016_root, tmp_path / "copy", "dev", ["dog-agility"], progress=False)
    pixels = evaluate_davis("pixels", davis2016_root, tmp_path / "pixels", "dev", ["dog-agility"], progress=False)
    assert pixels["jf_mean"] > copy["jf_mean"] + 0.2


def test_topk_above_keeps_every_entry_that_can_enter_the_top_k():
    from fmapicon.evaluation.propagate import _topk_above

    scores = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(1))
    floor = torch.randn(3, 4, generator=torch.Generator().manual_seed(2)) + 1.8
    values, index = _topk_above(scores, 5, floor)
    counts = (scores > floor[..., None]).sum(-1)
    assert (counts == 0).any() and ((counts > 0) & (counts <= 5)).any() and (counts > 5).any()
    full_values, _ = scores.topk(5, dim=-1)
    # the entries above the floor, or the row's top-k when there are more than k
    kept = torch.where(values > floor[..., None], values, -math.inf).sort(-1, descending=True).values
    expected = torch.where(full_values > floor[..., None], full_values, -math.inf)
    assert torch.equal(kept, expected)
    finite = torch.isfinite(values)
    assert torch.equal(torch.gather(scores, -1, index)[finite], values[finite])
    assert torch.equal(values.isfinite().sum(-1), counts.clamp(max=5))
    assert torch.equal(_topk_above(scores, 5, None)[0], full_values)


# --------------------------------------------------------------------------- sparse, short, output folder


def _moving_root(root, frames=8, first=0, names=None, set_name="val"):
    """A bright 6 x 6 square moving 2 px/frame right over black, 32 x 48; annotated from ``first``."""
    names = names or [f"{t:05d}" for t in range(frames)]
    ids = np.zeros((frames, 32, 48), np.uint8)
    for t in range(frames):
        ids[t, 10:16, 4 + 2 * t:10 + 2 * t] = 1
    from PIL import Image

    for t in range(frames):
        (root / "JPEGImages" / "480p" / "seq").mkdir(parents=True, exist_ok=True)
        Image.fromarray((ids[t] * 250).astype(np.uint8)).convert("RGB").save(
            root / "JPEGImages" / "480p" / "seq" / f"{names[t]}.png")
        if t >= first:
            write_indexed_png(root / "Annotations" / "480p" / "seq" / f"{names[t]}.png", ids[t])
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / f"{set_name}.txt").write_text("seq\n")
    return ids


def test_propagation_starts_at_the_first_annotated_frame(tmp_path):
    ids = _moving_root(tmp_path / "davis", first=3)
    evaluate_davis("pixels", tmp_path / "davis", tmp_path / "out", params=PropagationParams(stride=2),
                   progress=False, device="cpu")
    for t in range(3):  # nothing is known before the first annotation: background
        assert not read_annotation(tmp_path / "out" / "seq" / f"{t:05d}.png").any()
    assert np.array_equal(read_annotation(tmp_path / "out" / "seq" / "00003.png"), ids[3])
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert record["timings"]["seq"]["first_annotated"] == 3 and record["timings"]["seq"]["frames"] == 5


def test_unpadded_names_propagate_in_temporal_order(tmp_path):
    names = [str(t + 1) for t in range(12)]
    ids = _moving_root(tmp_path / "davis", frames=12, names=names)
    evaluate_davis("copy", tmp_path / "davis", tmp_path / "copy", progress=False)
    result = evaluate_davis("pixels", tmp_path / "davis", tmp_path / "out", params=PropagationParams(stride=2),
                            progress=False, device="cpu")
    assert result["per_frame"]["seq_1"]["frames"] == names[1:-1]  # scored in temporal order
    # the square moves right: the propagated masks follow it frame after frame, in 1, 2, ..., 12 order
    centres = [np.argwhere(read_annotation(tmp_path / "out" / "seq" / f"{n}.png") == 1)[:, 1].mean() for n in names]
    assert all(b > a for a, b in zip(centres, centres[1:]))
    assert ids.shape[0] == 12


def test_sequences_with_nothing_to_score_are_skipped_and_json_is_strict(tmp_path):
    from fmapicon.evaluation.metrics import SkippedSequenceWarning

    root = tmp_path / "davis"
    for name, frames in (("one", 1), ("two", 2)):
        _moving_root(root, frames=frames)
        (root / "JPEGImages" / "480p" / "seq").rename(root / "JPEGImages" / "480p" / name)
        (root / "Annotations" / "480p" / "seq").rename(root / "Annotations" / "480p" / name)
    _moving_root(root, frames=6)
    (root / "ImageSets" / "2017" / "val.txt").write_text("seq\none\ntwo\n")
    with pytest.warns(SkippedSequenceWarning) as caught:
        result = evaluate_davis("copy", root, tmp_path / "out", progress=False)
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["one", "two"]
    assert result["skipped"] == ["one", "two"] and result["sequences"] == ["seq"]
    text = (tmp_path / "out" / "eval.json").read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in eval.json"))
    assert record["skipped"] == ["one", "two"] and math.isfinite(record["jf_mean"])
    (root / "ImageSets" / "2017" / "val.txt").write_text("one\ntwo\n")
    with pytest.warns(SkippedSequenceWarning), pytest.raises(UserError, match="nothing to score"):
        score_davis(root, tmp_path / "out", progress=False)


def test_failed_evaluation_leaves_the_out_folder_untouched(tmp_path, monkeypatch):
    import fmapicon.evaluation.propagate as propagate

    _moving_root(tmp_path / "davis")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(propagate, "_write_record", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate_davis("copy", tmp_path / "davis", out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_cli_eval_refuses_an_existing_out_unless_force(tmp_path, capsys):
    from fmapicon.cli import main

    _moving_root(tmp_path / "davis")
    out = tmp_path / "out"
    argv = ["eval", "--davis", str(tmp_path / "davis"), "--model", "copy", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "pass --force" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(argv + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "global_results-val.csv", "notes.txt",
                                                     "per-sequence_results-val.csv", "seq"]
