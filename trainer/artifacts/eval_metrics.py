"""The metrics `evaluate` reports, as pure functions of CPU logits and labels.

Top-k accuracy, ReaL accuracy, calibration (ECE, NLL, one fitted temperature), the column pick for
sets scored on a subset of the classes (ImageNet-A/-R), and ImageNet-C's corruption errors against
AlexNet's. Accuracies and errors are fractions in [0, 1], never percentages; CE and mCE are ratios
(1.0 is AlexNet's), which papers print multiplied by 100 (ResNet-50: mCE 76.7%).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

# ImageNet-C errors of AlexNet (torchvision's weights, the ones hendrycks/robustness' ImageNet-C/test.py
# loads), per corruption and severity 1-5: the table "AlexNet ImageNet-C Error" of the hendrycks/robustness
# README, added in commit 76d93933ab5ff56044973bbd4efe75cc2a795a7a (2019-10-10) and replaced by a
# spreadsheet link in 5aa129ed (2020-05-05):
# https://github.com/hendrycks/robustness/blob/76d93933ab5ff56044973bbd4efe75cc2a795a7a/README.md
# The first 15 are the benchmark's corruptions (mCE is over them); the last 4 are its held-out ones.
ALEXNET_SEVERITY_ERRORS: dict[str, tuple[float, float, float, float, float]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.94870, 0.98720, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.58430, 0.70048, 0.82108, 0.89750, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.91870, 0.94952),
    "frost": (0.61390, 0.79734, 0.88790, 0.89942, 0.93430),
    "fog": (0.67474, 0.76050, 0.84378, 0.87260, 0.94500),
    "brightness": (0.45140, 0.48502, 0.54048, 0.62166, 0.72440),
    "contrast": (0.64548, 0.76150, 0.88874, 0.97760, 0.99270),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.54620, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
    # Held out from mCE by the benchmark ("extra" in the ImageNet-C download).
    "speckle_noise": (0.66192, 0.74440, 0.90246, 0.94548, 0.97268),
    "gaussian_blur": (0.54732, 0.70444, 0.82574, 0.89864, 0.95940),
    "spatter": (0.47196, 0.62194, 0.75052, 0.84132, 0.90182),
    "saturate": (0.59342, 0.65514, 0.51174, 0.70834, 0.82260),
}
HELD_OUT_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

# The 15 benchmark corruptions' AlexNet errors averaged over severities (the README table's "Average"
# column, same source as above); mCE is the mean CE over these.
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}

# AlexNet's clean ImageNet val top-1 error, for relative CE: torchvision's AlexNet_Weights.IMAGENET1K_V1
# reports acc@1 56.522 (the weights hendrycks/robustness evaluated on ImageNet-C); Hendrycks & Dietterich
# 2019 (arXiv:1903.12261), Table 1, print it rounded: 43.5%.
ALEXNET_CLEAN_ERROR: float = 1.0 - 0.56522


def _check_logits(logits: torch.Tensor, n: int | None = None, what: str = "labels") -> None:
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [images, classes] with at least one of each, got shape "
                         f"{tuple(logits.shape)}")
    if n is not None and n != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {n} {what}: they must pair one to one")


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    _check_logits(logits, labels.numel())
    labels = labels.reshape(-1).long()
    bad = (labels < 0) | (labels >= logits.shape[1])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"label {int(labels[i])} of image {i} is not a class index in "
                         f"0..{logits.shape[1] - 1}")
    return labels


def _topk(logits: torch.Tensor, ks: Iterable[int]) -> tuple[dict[int, int], torch.Tensor]:
    """Each requested k clipped to [1, classes], and the top max(k) class indices per row."""
    clipped = {}
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        clipped[int(k)] = min(int(k), logits.shape[1])
    return clipped, logits.topk(max(clipped.values()), dim=1).indices


def accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy, a fraction, for each k in `ks`: an image counts when its label is among its k
    largest logits. k above the number of classes is clipped to it (so top-5 of a 3-class model is
    1.0); the result stays keyed by the k asked for."""
    labels = _check_labels(logits, labels)
    clipped, top = _topk(logits, ks)
    hit = top == labels[:, None]
    return {k: hit[:, :kk].any(dim=1).double().mean().item() for k, kk in clipped.items()}


def real_accuracy(logits: torch.Tensor, real: list[list[int]],
                  ks: Sequence[int] = (1, 5)) -> tuple[dict[int, float], int]:
    """ReaL top-k accuracy (Beyer et al. 2020, "Are we done with ImageNet?"): an image is correct when
    any of its top-k classes is in its list of ReaL labels. Images with an empty list (no agreed label)
    are left out of numerator and denominator, as in the paper's evaluation. Returns the accuracies
    (keyed by the k asked for, k clipped as in `accuracy`) and the number of images used."""
    _check_logits(logits, len(real), "ReaL label lists")
    classes = logits.shape[1]
    for i, labels in enumerate(real):
        for c in labels:
            if not 0 <= int(c) < classes:
                raise ValueError(f"ReaL labels of image {i} hold {c}, not a class index in 0..{classes - 1}")
    used = [i for i, labels in enumerate(real) if labels]
    if not used:
        raise ValueError(f"all {len(real)} ReaL label lists are empty: no image to score")
    clipped, top = _topk(logits[used], ks)
    top_rows = top.tolist()  # one conversion: 50,000 tensor slices would cost seconds
    out = {}
    for k, kk in clipped.items():
        hits = sum(1 for row, i in zip(top_rows, used) if not set(row[:kk]).isdisjoint(real[i]))
        out[k] = hits / len(used)
    return out, len(used)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017), L1, of the top-1 prediction:
    ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|, where conf is the softmax probability of the predicted
    class and B_b the images whose conf falls in the b-th of `n_bins` equal-width bins [b/n, (b+1)/n).
    Binned exactly as torchmetrics' MulticlassCalibrationError(n_bins=15, norm="l1") does (float32
    softmax, right-open bins, a confidence of exactly 1.0 in a bin of its own), so the two agree."""
    labels = _check_labels(logits, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = logits.float().softmax(dim=1).max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    bins = torch.bucketize(conf, edges, right=True) - 1
    count = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, bins, torch.ones_like(correct))
    conf_sum = torch.zeros_like(count).index_add_(0, bins, conf.double())
    acc_sum = torch.zeros_like(count).index_add_(0, bins, correct)
    # Each bin's |acc - conf| * |B|/N is |sum(correct) - sum(conf)| / N: no division by empty bins.
    return ((acc_sum - conf_sum).abs().sum() / conf.numel()).item()


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits), in nats:
    NLL = -1/N sum_i log softmax(z_i)[y_i] (the cross-entropy loss), computed in float64."""
    labels = _check_labels(logits, labels)
    return torch.nn.functional.cross_entropy(logits.double(), labels).item()


_T_MIN, _T_MAX = 0.01, 100.0
_CHUNK = 8192  # rows per float64 pass, so a 50,000 x 1,000 val set never needs a second full copy


def _nll_slope(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> tuple[float, float]:
    """First and second derivative in beta of the mean NLL of softmax(beta * z):
    d/dbeta = mean(E_p[z] - z_y), d2/dbeta2 = mean(Var_p[z]) >= 0 (so the NLL is convex in beta)."""
    g = h = 0.0
    for start in range(0, logits.shape[0], _CHUNK):
        z = logits[start:start + _CHUNK].double()
        y = labels[start:start + _CHUNK]
        p = (beta * z).softmax(dim=1)
        mean = (p * z).sum(dim=1)
        g += (mean - z.gather(1, y[:, None]).squeeze(1)).sum().item()
        h += ((p * z * z).sum(dim=1) - mean * mean).clamp_min(0).sum().item()
    n = logits.shape[0]
    return g / n, h / n


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the one T > 0 minimising the mean NLL of softmax(logits / T).
    With beta = 1/T the NLL is convex in beta, so the root of its derivative is found by Newton steps kept
    inside a shrinking bracket (bisection when a step leaves it). T is searched in [0.01, 100]: the end is
    returned when the optimum lies beyond it (every image right with a margin pushes T to 0; logits that
    do worse than uniform push T to infinity). Accuracy is unchanged by T; only the confidences move."""
    labels = _check_labels(logits, labels)
    lo, hi = 1.0 / _T_MAX, 1.0 / _T_MIN
    if _nll_slope(logits, labels, lo)[0] >= 0:
        return _T_MAX
    if _nll_slope(logits, labels, hi)[0] <= 0:
        return _T_MIN
    beta = 1.0
    for _ in range(100):
        g, h = _nll_slope(logits, labels, beta)
        if g < 0:
            lo = beta
        else:
            hi = beta
        if g == 0 or hi / lo < 1 + 1e-12:
            break
        step = beta - g / h if h > 0 else float("nan")
        if lo < step < hi:
            converged = abs(step - beta) < 1e-9 * beta
            beta = step
            if converged:
                break
        else:
            beta = (lo * hi) ** 0.5
    return 1.0 / beta


def restrict(logits: torch.Tensor, model_classes: Sequence[str],
             wnids: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
    """The columns of `logits` for the classes named by `wnids`, in `wnids`' order, and their indices in
    the model's classes. For sets scored on a subset of the classes (ImageNet-A and -R: 200 each), a
    label i then means wnids[i]. Raises ValueError naming the wnids the model lacks."""
    _check_logits(logits)
    if logits.shape[1] != len(model_classes):
        raise ValueError(f"logits have {logits.shape[1]} columns but the model names "
                         f"{len(model_classes)} classes")
    where: dict[str, int] = {}
    for i, w in enumerate(model_classes):
        where.setdefault(w, i)
    missing = [w for w in wnids if w not in where]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(f"the model has no class for {len(missing)} of the set's {len(wnids)} wnids: "
                         f"{shown}; evaluate it only on sets whose classes it was trained on")
    index = [where[w] for w in wnids]
    return logits[:, index], index


def corruption_summary(errors: dict[str, dict[int, float]], clean_error: float | None) -> dict:
    """ImageNet-C summary (Hendrycks & Dietterich 2019, arXiv:1903.12261, section 3) of top-1 errors
    `errors[corruption][severity]` (fractions; severities 1-5, any subset) and the model's clean val
    top-1 error (None: no relative CE).

    Per corruption c, over the severities s measured:
      error          = mean_s E(c, s)
      ce             = sum_s E(c, s) / sum_s E_AlexNet(c, s)
      relative_ce    = sum_s (E(c, s) - E_clean) / sum_s (E_AlexNet(c, s) - E_AlexNet_clean)
    mce and relative_mce are the means of ce and relative_ce over the benchmark's 15 corruptions that
    are present (`mce_corruptions`); with all 5 severities, ce equals mean error / ALEXNET_ERRORS[c].
    A corruption AlexNet has no error for is reported (error, severities) with ce None and left out of
    mCE; one of the 4 held-out corruptions gets its ce but is left out too. `left_out` says why for each.
    `severity_error[s]` is the mean error at severity s over all corruptions present, `mean_error` the
    mean of the per-corruption errors. mce is None when no benchmark corruption is present."""
    if not errors:
        raise ValueError("no corruption errors to summarise")
    if clean_error is not None and not 0.0 <= clean_error <= 1.0:
        raise ValueError(f"clean_error={clean_error} is not a fraction in [0, 1] (errors are not percentages)")
    corruptions: dict[str, dict] = {}
    left_out: dict[str, str] = {}
    by_severity: dict[int, list[float]] = {}
    for name, per_severity in errors.items():
        if not per_severity:
            raise ValueError(f"corruption {name!r} has no severity measured")
        for s, e in per_severity.items():
            if int(s) not in range(1, 6):
                raise ValueError(f"corruption {name!r} has severity {s}: ImageNet-C's are 1 to 5")
            if not 0.0 <= e <= 1.0:
                raise ValueError(f"error {e} of {name!r} severity {s} is not a fraction in [0, 1] "
                                 "(errors are not percentages)")
            by_severity.setdefault(int(s), []).append(float(e))
        severities = {int(s): float(e) for s, e in sorted(per_severity.items())}
        row = {"error": sum(severities.values()) / len(severities), "severities": severities,
               "ce": None, "relative_ce": None}
        alex = ALEXNET_SEVERITY_ERRORS.get(name)
        if alex is None:
            left_out[name] = "AlexNet has no error for it in hendrycks/robustness' table"
        else:
            alex_sum = sum(alex[s - 1] for s in severities)
            row["ce"] = sum(severities.values()) / alex_sum
            if clean_error is not None:
                row["relative_ce"] = (sum(e - clean_error for e in severities.values())
                                      / (alex_sum - len(severities) * ALEXNET_CLEAN_ERROR))
            if name in HELD_OUT_CORRUPTIONS:
                left_out[name] = "held out of the benchmark's 15 corruptions (ImageNet-C 'extra')"
        corruptions[name] = row
    in_mce = [n for n in corruptions if n in ALEXNET_ERRORS]
    mce = sum(corruptions[n]["ce"] for n in in_mce) / len(in_mce) if in_mce else None
    relative_mce = (sum(corruptions[n]["relative_ce"] for n in in_mce) / len(in_mce)
                    if in_mce and clean_error is not None else None)
    return {
        "corruptions": corruptions,
        "severity_error": {s: sum(v) / len(v) for s, v in sorted(by_severity.items())},
        "mean_error": sum(r["error"] for r in corruptions.values()) / len(corruptions),
        "mce": mce,
        "relative_mce": relative_mce,
        "mce_corruptions": in_mce,
        "left_out": left_out,
        "clean_error": clean_error,
    }
