"""Flow fields: .flo I/O, end-point error, warping and resizing, against known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmapicon.errors import UserError
from fmapicon.data.flow import end_point_error, epe_stats, read_flo, resize_flow, warp, warp_image, write_flo
from fmapicon.experiments.figures import flow_to_color


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (13, 1), (384, 512)])
def test_flo_round_trip_is_bit_exact(tmp_path, shape):
    rng = np.random.default_rng(sum(shape))
    flow = (rng.standard_normal((*shape, 2)) * 50).astype(np.float32)
    path = tmp_path / "f.flo"
    write_flo(path, flow)
    back = read_flo(path)
    assert back.shape == flow.shape and back.dtype == np.float32
    assert back.tobytes() == flow.tobytes()
    assert path.stat().st_size == 12 + flow.size * 4


def test_corrupt_flo_raises_user_error(tmp_path):
    good = tmp_path / "good.flo"
    write_flo(good, np.ones((4, 6, 2), np.float32))
    data = good.read_bytes()
    cases = {
        "magic.flo": np.float32(1.0).tobytes() + data[4:],  # wrong magic number
        "short.flo": data[:8],  # not even a header
        "truncated.flo": data[:-4],  # header says more data than there is
        "longer.flo": data + b"\0\0\0\0",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError):
            read_flo(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_flo(tmp_path / "missing.flo")


def test_epe_of_ground_truth_is_zero_and_of_an_offset_is_the_offset():
    rng = np.random.default_rng(0)
    gt = rng.standard_normal((9, 11, 2)).astype(np.float32) * 10
    assert np.all(end_point_error(gt, gt) == 0)
    assert epe_stats(gt, gt) == {"epe_mean": 0.0, "epe_median": 0.0, "outliers_3px": 0.0, "known_pixels": 99,
                                 "unknown_gt_pixels": 0, "unknown_flow_pixels": 0}
    shifted = gt + np.array([3.0, 4.0], np.float32)  # a constant (3, 4) offset: 5 px everywhere
    np.testing.assert_allclose(end_point_error(shifted, gt), 5.0, rtol=1e-6)
    stats = epe_stats(shifted, gt)
    assert stats["epe_mean"] == pytest.approx(5.0) and stats["epe_median"] == pytest.approx(5.0)
    assert stats["outliers_3px"] == 1.0


def test_epe_outlier_share_and_tensor_form():
    gt = np.zeros((2, 5, 2), np.float32)
    flow = gt.copy()
    flow[0, :, 0] = [0.0, 1.0, 3.0, 3.5, 10.0]  # two of ten pixels err by more than 3
    stats = epe_stats(flow, gt)
    assert stats["outliers_3px"] == pytest.approx(0.2)
    assert stats["epe_mean"] == pytest.approx(17.5 / 10)
    assert stats["epe_median"] == pytest.approx(0.0)
    tensor = end_point_error(torch.from_numpy(flow).permute(2, 0, 1)[None], torch.zeros(1, 2, 2, 5))
    np.testing.assert_allclose(tensor[0].numpy(), end_point_error(flow, gt), rtol=1e-6)


def test_epe_skips_unknown_ground_truth_and_rejects_size_mismatch():
    gt = np.zeros((2, 2, 2), np.float32)
    gt[0, 0] = 1e10  # Middlebury's marker for an unknown flow
    flow = np.ones((2, 2, 2), np.float32)
    assert epe_stats(flow, gt)["epe_mean"] == pytest.approx(np.sqrt(2))
    with pytest.raises(UserError, match="differ in size"):
        epe_stats(np.zeros((3, 2, 2)), gt)


def test_warping_by_an_integer_flow_shifts_the_image():
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(10, 12, 3)).astype(np.float32)
    flow = np.zeros((10, 12, 2), np.float32)
    flow[..., 0], flow[..., 1] = 2, -1  # output(y, x) = image(y - 1, x + 2)
    warped = warp_image(image, flow)
    np.testing.assert_allclose(warped[1:, :-2], image[:-1, 2:], atol=1e-6)
    assert np.all(warped[0] == 0) and np.all(warped[:, -2:] == 0)  # outside reads zero
    border = warp_image(image, flow, padding="border")
    np.testing.assert_allclose(border[0, :-2], image[0, 2:], atol=1e-6)
    assert warp is warp_image


def test_warping_torch_matches_numpy_and_bilinear_is_exact_on_a_ramp():
    ys, xs = np.mgrid[0:8, 0:9].astype(np.float64)
    ramp = (2 * xs + 3 * ys)[..., None]
    flow = np.full((8, 9, 2), 0.25)
    flow[..., 1] = -0.5
    warped = warp_image(ramp, flow)
    # bilinear interpolation reproduces a linear function: ramp(x + 0.25, y - 0.5)
    np.testing.assert_allclose(warped[1:, :-1, 0], (ramp[..., 0] + 0.5 - 1.5)[1:, :-1], atol=1e-9)
    tensor = warp_image(torch.from_numpy(ramp).permute(2, 0, 1)[None].float(),
                        torch.from_numpy(flow).permute(2, 0, 1)[None].float())
    np.testing.assert_allclose(tensor[0, 0].numpy(), warped[..., 0], atol=1e-4)


def test_nearest_warping_keeps_mask_labels():
    mask = np.zeros((6, 6), np.uint8)
    mask[1:3, 1:3] = 7
    flow = np.full((6, 6, 2), -1.4)  # rounds to a (-1, -1) shift
    warped = warp_image(mask, flow, mode="nearest")
    assert warped.dtype == np.uint8 and set(np.unique(warped)) <= {0, 7}
    np.testing.assert_array_equal(warped[2:4, 2:4], 7)
    assert warped.sum() == 4 * 7
    tensor = warp_image(torch.from_numpy(mask)[None, None], torch.from_numpy(flow).permute(2, 0, 1)[None].float(),
                        mode="nearest")
    assert tensor.dtype == torch.uint8
    np.testing.assert_array_equal(tensor[0, 0].numpy(), warped)


def test_resize_flow_scales_displacements_per_axis():
    flow = np.zeros((3, 4, 2), np.float32)
    flow[..., 0], flow[..., 1] = 1.0, 2.0
    big = resize_flow(flow, (6, 12))
    assert big.shape == (6, 12, 2)
    np.testing.assert_allclose(big[..., 0], 3.0)  # width x3
    np.testing.assert_allclose(big[..., 1], 4.0)  # height x2
    tensor = resize_flow(torch.from_numpy(flow).permute(2, 0, 1)[None], (6, 12))
    np.testing.assert_allclose(tensor[0].permute(1, 2, 0).numpy(), big)
    with pytest.raises(ValueError):
        resize_flow(flow, (0, 3))


def test_warping_by_the_true_synthetic_flow_reproduces_the_frame(request):
    pytest.importorskip("fmapicon.data.synth")
    from PIL import Image

    root = request.getfixturevalue("synth_root")
    flows = sorted((root / "Flow").glob("*/00000.flo"))
    assert flows, f"no Flow/<seq>/00000.flo under {root}"
    for path in flows:
        frames = root / "JPEGImages" / "480p" / path.parent.name
        masks = root / "Annotations" / "480p" / path.parent.name
        frame0, frame1 = (np.asarray(Image.open(frames / f"{t:05d}.jpg").convert("RGB"), np.float32) / 255
                          for t in (0, 1))
        mask0, mask1 = (np.asarray(Image.open(masks / f"{t:05d}.png")) for t in (0, 1))
        flow = read_flo(path)
        visible = _visible(mask0, mask1, flow)
        assert visible.mean() > 0.5
        warped = warp_image(frame1, flow)  # frame 1 pulled back onto frame 0's grid
        error = np.abs(warped - frame0).mean(axis=-1)[visible].mean()
        # control: a flow one pixel off does far worse
        off = np.abs(warp_image(frame1, flow + np.float32([1, 0])) - frame0).mean(axis=-1)[visible].mean()
        assert error < 0.03, f"{path}: warped frame differs by {error:.4f} on visible pixels"
        assert error < 0.5 * off, f"{path}: true flow {error:.4f} vs one pixel off {off:.4f}"
        np.testing.assert_array_equal(warp_image(mask1, flow, mode="nearest")[visible], mask0[visible])


def _visible(mask0, mask1, flow):
    """Pixels of frame 0 that land inside frame 1 on the same object, away from object edges
    (where JPEG, anti-aliasing and bilinear sampling mix two surfaces)."""
    from scipy.ndimage import binary_erosion

    height, width = mask0.shape
    ys, xs = np.mgrid[0:height, 0:width]
    target_x, target_y = xs + flow[..., 0], ys + flow[..., 1]
    inside = (target_x >= 0) & (target_x <= width - 1) & (target_y >= 0) & (target_y <= height - 1)
    same = warp_image(mask1, flow, mode="nearest") == mask0
    interior = np.zeros_like(inside)
    for label in np.unique(mask0):
        interior |= binary_erosion(mask0 == label, iterations=2)
    return inside & same & interior


def test_unknown_flow_is_unknown_everywhere(tmp_path):
    from fmapicon.data.flow import known_flow, max_known_length, write_flo

    rng = np.random.default_rng(6)
    gt = rng.normal(size=(6, 7, 2)).astype(np.float32) * 3
    flow = gt + rng.normal(size=gt.shape).astype(np.float32)
    gt[0, 0, 0], gt[1, 2, 1], gt[3, 3] = 1e10, np.nan, 2e9       # three unknown truth pixels
    flow[5, 6, 0] = np.inf                                        # one unknown estimate
    write_flo(tmp_path / "gt.flo", gt)
    gt = read_flo(tmp_path / "gt.flo")
    known = np.ones((6, 7), bool)
    known[0, 0] = known[1, 2] = known[3, 3] = known[5, 6] = False
    assert np.array_equal(known_flow(gt) & known_flow(flow), known)
    plain = np.sqrt(((flow.astype(np.float64) - gt) ** 2).sum(-1))[known]   # the definition, on known pixels
    stats = epe_stats(flow, gt)
    assert stats["epe_mean"] == pytest.approx(plain.mean()) and stats["epe_median"] == pytest.approx(np.median(plain))
    assert stats["outliers_3px"] == pytest.approx((plain > 3).mean())
    assert (stats["known_pixels"], stats["unknown_gt_pixels"], stats["unknown_flow_pixels"]) == (38, 3, 1)
    assert np.isnan(end_point_error(flow, gt)[~known]).all()
    tensor = end_point_error(torch.from_numpy(flow).permute(2, 0, 1)[None], torch.from_numpy(gt).permute(2, 0, 1)[None])
    assert torch.isnan(tensor[0][torch.from_numpy(~known)]).all()
    # the picture scales by the known pixels only: unknown is black, the longest known is full hue
    longest = max_known_length(gt)
    assert longest == pytest.approx(np.hypot(gt[..., 0], gt[..., 1])[known_flow(gt)].max())
    np.testing.assert_array_equal(flow_to_color(gt), flow_to_color(gt, longest))
    assert (flow_to_color(gt)[~known_flow(gt)] == 0).all()
    # resampling keeps unknown unknown
    assert not known_flow(resize_flow(gt, (12, 14)))[:2, :2].any()
    with pytest.raises(UserError, match="no pixel"):
        epe_stats(flow, np.full_like(gt, 1e10))
