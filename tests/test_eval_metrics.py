"""evaluate's metrics (trainer/artifacts/eval_metrics.py), each against an independent computation:
torchmetrics for ECE, PyTorch's cross-entropy for NLL, loops for (ReaL) top-k, hand arithmetic for mCE."""
from __future__ import annotations

import math

import pytest
import torch
# At import, like trainer/module.py: the package costs seconds to load, once per suite, not per test.
from torchmetrics.classification import MulticlassCalibrationError

from trainer.artifacts import eval_metrics as em


def _logits(n: int, classes: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, classes, generator=torch.Generator().manual_seed(seed)) * scale


def _labels(n: int, classes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _in_top_k(row: list[float], label: int, k: int) -> bool:
    """Brute force: the label is in the top k when fewer than k classes score strictly higher."""
    return sum(1 for v in row if v > row[label]) < k


# ---------------------------------------------------------------- accuracy


def test_accuracy_matches_a_brute_force_count():
    logits, labels = _logits(300, 7, 0), _labels(300, 7, 1)
    got = em.accuracy(logits, labels, ks=(1, 3, 5))
    for k in (1, 3, 5):
        want = sum(_in_top_k(r, y, k) for r, y in zip(logits.tolist(), labels.tolist())) / 300
        assert got[k] == pytest.approx(want, abs=1e-12)
    assert 0.1 < got[1] < 0.3 < got[3] < got[5] < 1.0  # random logits: near chance, and the test can fail


def test_accuracy_clips_k_to_the_number_of_classes_and_keeps_the_key_asked_for():
    logits, labels = _logits(40, 3, 2), _labels(40, 3, 3)
    got = em.accuracy(logits, labels, ks=(1, 5))
    assert set(got) == {1, 5}
    assert got[5] == 1.0
    assert got[1] == pytest.approx(sum(_in_top_k(r, y, 1) for r, y in zip(logits.tolist(), labels.tolist())) / 40)


def test_accuracy_refuses_labels_that_are_no_class_and_unpaired_rows():
    logits = _logits(4, 3, 4)
    with pytest.raises(ValueError, match="label 3 of image 2 is not a class index in 0..2"):
        em.accuracy(logits, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="4 rows of logits but 3 labels"):
        em.accuracy(logits, torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------- ReaL


def test_real_accuracy_matches_a_brute_force_count_and_leaves_empty_lists_out():
    n, classes = 120, 6
    logits = _logits(n, classes, 5)
    g = torch.Generator().manual_seed(6)
    real = []
    for i in range(n):
        size = [0, 1, 1, 2, 3][i % 5]  # every fifth image has no ReaL label; some have several
        real.append(torch.randperm(classes, generator=g)[:size].tolist())
    got, used = em.real_accuracy(logits, real, ks=(1, 2, 5))
    assert used == n - n // 5
    for k in (1, 2, 5):
        hits = sum(any(_in_top_k(row, c, k) for c in labels) for row, labels in zip(logits.tolist(), real) if labels)
        assert got[k] == pytest.approx(hits / used, abs=1e-12)


def test_real_accuracy_counts_an_image_right_when_its_top1_is_any_of_its_labels():
    logits = torch.tensor([[0.0, 0.1, 0.0, 0.0, 3.0],   # top-1 is 4: in [2, 4], right
                           [5.0, 0.0, 0.0, 0.0, 0.0],   # no ReaL label: not counted at all
                           [0.0, 2.0, 1.0, 0.0, 0.0]])  # top-1 is 1, top-2 adds 2: wrong at 1, right at 2
    got, used = em.real_accuracy(logits, [[2, 4], [], [2]], ks=(1, 2))
    assert used == 2
    assert got == {1: 0.5, 2: 1.0}


def test_real_accuracy_refuses_lists_it_cannot_pair_or_score():
    logits = _logits(2, 3, 7)
    with pytest.raises(ValueError, match="2 rows of logits but 3 ReaL label lists"):
        em.real_accuracy(logits, [[0], [1], [2]])
    with pytest.raises(ValueError, match="ReaL labels of image 1 hold 7"):
        em.real_accuracy(logits, [[0], [7]])
    with pytest.raises(ValueError, match="all 2 ReaL label lists are empty"):
        em.real_accuracy(logits, [[], []])


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("seed,scale,classes", [(10, 1.0, 5), (11, 3.0, 10), (12, 8.0, 100)])
def test_ece_equals_torchmetrics(seed, scale, classes):
    logits, labels = _logits(2000, classes, seed, scale), _labels(2000, classes, seed + 100)
    # Some rows made right and confident, so the upper bins are filled too.
    logits[:600].scatter_(1, labels[:600, None], 10.0)
    assert (logits < 0).any()  # torchmetrics softmaxes only inputs outside [0, 1]: these are logits to it
    metric = MulticlassCalibrationError(num_classes=classes, n_bins=15, norm="l1")
    want = metric(logits, labels).item()
    assert em.expected_calibration_error(logits, labels, n_bins=15) == pytest.approx(want, abs=1e-6)
    assert want > 0.01  # not a trivially calibrated case


def test_ece_counts_a_confidence_of_exactly_one_in_a_bin_of_its_own_as_torchmetrics_does():
    # Two rows at confidence 1.0 (one right, one wrong), one right at 0.943 (the last bin, [14/15, 1)),
    # one right at 0.40: a 1.0 merged into the last bin would give |2 - 2.943| instead of |1 - 2| + |1 - 0.943|.
    logits = torch.tensor([[200.0, 0.0, 0.0], [0.0, 200.0, 0.0], [3.5, 0.0, 0.0], [0.0, 0.3, 0.0]])
    labels = torch.tensor([0, 2, 0, 1])
    conf = logits.softmax(1).max(1).values
    assert conf[0].item() == 1.0 and 14 / 15 < conf[2].item() < 1.0
    want = MulticlassCalibrationError(num_classes=3, n_bins=15, norm="l1")(logits, labels).item()
    got = em.expected_calibration_error(logits, labels)
    assert got == pytest.approx(want, abs=1e-6)
    assert got == pytest.approx((abs(1 - 2.0) + abs(1 - conf[2].item()) + abs(1 - conf[3].item())) / 4, abs=1e-6)


def test_ece_by_hand_on_two_bins():
    # Confidences 0.9 (right), 0.9 (wrong), 0.5 (right): bins give |0.5 - 0.9| * 2/3 + |1 - 0.5| * 1/3.
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.5 + 1e-4, 0.5 - 1e-4]])
    got = em.expected_calibration_error(p.log(), torch.tensor([0, 1, 0]))
    assert got == pytest.approx(0.4 * 2 / 3 + (1 - 0.5001) / 3, abs=1e-5)


def test_nll_equals_cross_entropy():
    logits, labels = _logits(500, 12, 20, 4.0), _labels(500, 12, 21)
    want = torch.nn.functional.cross_entropy(logits, labels).item()
    assert em.negative_log_likelihood(logits, labels) == pytest.approx(want, rel=1e-6)
    # Uniform logits: log(classes), whatever the labels.
    assert em.negative_log_likelihood(torch.zeros(3, 12), torch.tensor([0, 5, 11])) == pytest.approx(math.log(12))


def _calibrated_set(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits) itself: T = 1 is the true temperature."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 2.0
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("factor", [3.0, 0.5])
def test_fit_temperature_recovers_the_factor_that_made_logits_over_or_under_confident(factor):
    logits, labels = _calibrated_set(10000, 10, 30)
    t = em.fit_temperature(logits * factor, labels)
    assert t == pytest.approx(factor, rel=0.04)  # 10,000 draws: the fit itself is off by about 1%
    # Scaling the logits scales the fitted temperature exactly.
    assert t / factor == pytest.approx(em.fit_temperature(logits, labels), rel=1e-6)


def test_fit_temperature_minimises_the_nll():
    logits, labels = _calibrated_set(4000, 10, 31)
    logits = logits * 2.0
    t = em.fit_temperature(logits, labels)
    nll = em.negative_log_likelihood(logits / t, labels)
    for other in (1.0, t - 0.1, t + 0.1):
        assert nll < em.negative_log_likelihood(logits / other, labels)
    # The accuracy is the temperature's to keep.
    assert em.accuracy(logits / t, labels) == em.accuracy(logits, labels)


def test_fit_temperature_stops_at_its_bounds_when_the_optimum_is_beyond():
    labels = torch.tensor([0, 1, 2, 0])
    right = torch.nn.functional.one_hot(labels, 3).float() * 5  # all right: sharper is always better
    assert em.fit_temperature(right, labels) == 0.01
    assert em.fit_temperature(-right, labels) == 100.0  # all wrong: flatter is always better


# ---------------------------------------------------------------- restrict


def test_restrict_picks_the_named_columns_in_the_sets_order():
    logits = torch.arange(12.0).reshape(3, 4)
    sub, index = em.restrict(logits, ["n01", "n02", "n03", "n04"], ["n04", "n02"])
    assert index == [3, 1]
    assert torch.equal(sub, logits[:, [3, 1]])
    # A label i of the set now means wnids[i]: top-1 of row 0 is column 0 = n04.
    assert sub.argmax(1).tolist() == [0, 0, 0]


def test_restrict_refuses_by_name_the_wnids_the_model_lacks():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"2 of the set's 3 wnids: n09, n07"):
        em.restrict(logits, ["n01", "n02", "n03"], ["n09", "n02", "n07"])
    with pytest.raises(ValueError, match="3 columns but the model names 2 classes"):
        em.restrict(logits, ["n01", "n02"], ["n01"])


# ---------------------------------------------------------------- ImageNet-C


def test_alexnet_table_is_consistent_with_its_own_averages():
    assert len(em.ALEXNET_ERRORS) == 15
    for name, mean in em.ALEXNET_ERRORS.items():
        assert sum(em.ALEXNET_SEVERITY_ERRORS[name]) / 5 == pytest.approx(mean, abs=1e-6), name
    assert set(em.ALEXNET_SEVERITY_ERRORS) == set(em.ALEXNET_ERRORS) | set(em.HELD_OUT_CORRUPTIONS)
    assert em.ALEXNET_CLEAN_ERROR == pytest.approx(0.435, abs=5e-4)  # the paper's 43.5%


def test_alexnet_scores_one_against_itself():
    errors = {n: dict(enumerate(v, start=1)) for n, v in em.ALEXNET_SEVERITY_ERRORS.items()}
    s = em.corruption_summary(errors, em.ALEXNET_CLEAN_ERROR)
    assert s["mce"] == pytest.approx(1.0) and s["relative_mce"] == pytest.approx(1.0)
    assert sorted(s["mce_corruptions"]) == sorted(em.ALEXNET_ERRORS)
    for name in em.HELD_OUT_CORRUPTIONS:
        assert s["corruptions"][name]["ce"] == pytest.approx(1.0) and name in s["left_out"]


def test_corruption_summary_by_hand_on_two_corruptions_and_two_severities():
    errors = {"gaussian_noise": {1: 0.5, 2: 0.6}, "fog": {2: 0.5, 1: 0.4},
              "my_blur": {1: 0.7, 2: 0.9}}  # no AlexNet error: reported, left out of mCE
    s = em.corruption_summary(errors, clean_error=0.3)
    g, f = s["corruptions"]["gaussian_noise"], s["corruptions"]["fog"]
    # AlexNet, severities 1 and 2 (hendrycks/robustness table): gaussian 0.69528, 0.82542; fog 0.67474,
    # 0.76050; clean 1 - 0.56522 = 0.43478.
    assert g["error"] == pytest.approx(0.55)
    assert g["ce"] == pytest.approx((0.5 + 0.6) / (0.69528 + 0.82542))
    assert g["relative_ce"] == pytest.approx((0.2 + 0.3) / ((0.69528 - 0.43478) + (0.82542 - 0.43478)))
    assert f["ce"] == pytest.approx((0.4 + 0.5) / (0.67474 + 0.76050))
    assert f["relative_ce"] == pytest.approx((0.1 + 0.2) / ((0.67474 - 0.43478) + (0.76050 - 0.43478)))
    assert f["severities"] == {1: 0.4, 2: 0.5}
    assert s["mce"] == pytest.approx((1.1 / 1.52070 + 0.9 / 1.43524) / 2)
    assert s["mce"] == pytest.approx(0.675212, abs=1e-6)  # (0.723348 + 0.627073) / 2
    assert s["relative_mce"] == pytest.approx((0.5 / 0.65114 + 0.3 / 0.56568) / 2)
    assert sorted(s["mce_corruptions"]) == ["fog", "gaussian_noise"]
    assert s["corruptions"]["my_blur"]["ce"] is None and s["corruptions"]["my_blur"]["error"] == pytest.approx(0.8)
    assert "AlexNet has no error" in s["left_out"]["my_blur"]
    assert s["severity_error"] == pytest.approx({1: (0.5 + 0.4 + 0.7) / 3, 2: (0.6 + 0.5 + 0.9) / 3})
    assert s["mean_error"] == pytest.approx((0.55 + 0.45 + 0.8) / 3)


def test_corruption_summary_without_a_clean_error_has_no_relative_ce():
    s = em.corruption_summary({"snow": {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5}}, None)
    assert s["relative_mce"] is None and s["corruptions"]["snow"]["relative_ce"] is None
    assert s["mce"] == pytest.approx(0.5 / 0.866816)  # all 5 severities: mean error over the average
    assert em.corruption_summary({"mine": {1: 0.5}}, None)["mce"] is None


@pytest.mark.parametrize("errors,message", [
    ({"fog": {6: 0.5}}, "severity 6: ImageNet-C's are 1 to 5"),
    ({"fog": {1: 45.0}}, "not a fraction"),
    ({"fog": {}}, "'fog' has no severity measured"),
    ({}, "no corruption errors"),
])
def test_corruption_summary_refuses_what_it_cannot_summarise(errors, message):
    with pytest.raises(ValueError, match=message):
        em.corruption_summary(errors, 0.3)
