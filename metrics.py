"""Evaluation metrics. Labels are binarised as (label == 1): negative pseudo-labels and -1 count as negatives.

mAP follows the original: scikit-learn's average precision per class (non-interpolated), 0 for a class
without positives (still included in the mean), mean x 100. It is computed here by scikit-learn's own steps,
each column sorted once for the clean and the observed labels: the same bits, several times faster on COCO's
sizes (tests/test_metrics.py compares with `average_precision_score` by equality).
"""
from __future__ import annotations

import numpy as np

TOP_K = (1, 3, 5)
THRESHOLDS = (0.5, 0.75)  # 0.75 is what Zhou et al. recommend for EM models (paper, Appendix E)


def _binarise(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels) == 1


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must be (N, C) of one shape, got {scores.shape} and {labels.shape}")
    if not np.isfinite(scores).all():  # as scikit-learn's check
        raise ValueError("scores contain NaN or infinity")
    return scores, _binarise(labels)


def per_class_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Average precision of each class (fraction in [0, 1]); 0 for a class without positives."""
    scores, y = _check(scores, labels)
    return _per_class_ap(scores, [y])[0]


def _per_class_ap(scores: np.ndarray, label_sets: list[np.ndarray]) -> list[np.ndarray]:
    """scikit-learn's `average_precision_score` of every column, for each boolean label matrix of `label_sets`,
    by the same operations (so the same bits, tests/test_metrics.py): scores sorted descending, one threshold per
    distinct score, precision = TP / (TP + FP), recall = TP / P, AP = -sum(diff(recall) * precision) over the
    curve with (recall 0, precision 1) appended. Each column is sorted once for all the label
    sets (the clean and the observed labels), which is where scikit-learn spends its time on large sets."""
    columns = np.ascontiguousarray(scores.T)  # one row per class: contiguous sorts and gathers
    # any sort gives scikit-learn's bits: the order inside a run of equal scores never reaches the AP, which
    # reads the cumulative counts only at the end of each run (the thresholds); quicksort is twice mergesort's speed
    order = np.argsort(columns, axis=1)[:, ::-1]
    label_sets = [np.ascontiguousarray(y.T) for y in label_sets]
    aps = [np.zeros(scores.shape[1]) for _ in label_sets]
    for c in range(scores.shape[1]):
        ranked = columns[c][order[c]]
        thresholds = np.r_[np.where(np.diff(ranked))[0], len(ranked) - 1]  # the last row of each distinct score
        for y, ap in zip(label_sets, aps):
            if not y[c].any():
                continue
            tps = np.cumsum(y[c][order[c]] * 1.0, dtype=np.float64)[thresholds]
            predicted = tps + (1 + thresholds - tps)  # TP + FP
            precision = np.zeros_like(tps)
            np.divide(tps, predicted, out=precision, where=(predicted != 0))
            recall = tps / tps[-1]
            precision, recall = np.hstack((precision[::-1], 1)), np.hstack((recall[::-1], 0))
            ap[c] = max(0.0, -np.sum(np.diff(recall) * precision[:-1]))
    return aps


def compute_map(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean average precision in percent (a class without positives counts 0)."""
    return float(100.0 * per_class_ap(scores, labels).mean())


def top_k_metrics(scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = TOP_K) -> dict[str, float]:
    """prec@k = hits/k, rec@k = hits/#positives (0 without positives), top@k = share of images with a hit,
    averaged over images; hits = true positives among the k highest scores."""
    scores, y = _check(scores, labels)
    order = np.argsort(scores, axis=1)[:, ::-1]  # descending; ties broken as the original's reversed argsort
    num_pos = y.sum(axis=1)
    out = {}
    for k in ks:
        hits = np.take_along_axis(y, order[:, :k], axis=1).sum(axis=1)
        out[f"prec_at_{k}"] = float(np.mean(hits / k))
        out[f"rec_at_{k}"] = float(np.mean(np.divide(hits, num_pos, out=np.zeros(len(y)), where=num_pos > 0)))
        out[f"top_{k}"] = float(np.mean(hits > 0))
    return out


def threshold_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Macro (mean over classes) and micro (pooled) precision, recall and F1 of `scores >= threshold`, in percent.

    A class with no predicted positives has precision 0, one with no positives recall 0 (sklearn's zero_division=0).
    """
    scores, y = _check(scores, labels)
    pred = scores >= threshold
    tp = (pred & y).sum(axis=0).astype(np.float64)
    fp = (pred & ~y).sum(axis=0).astype(np.float64)
    fn = (~pred & y).sum(axis=0).astype(np.float64)

    def prf(tp, fp, fn):
        p = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        r = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
        f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
        return p, r, f

    p_c, r_c, f_c = prf(tp, fp, fn)
    p_mi, r_mi, f_mi = prf(*(np.array([v.sum()]) for v in (tp, fp, fn)))
    return {"macro_precision": 100 * p_c.mean(), "macro_recall": 100 * r_c.mean(), "macro_f1": 100 * f_c.mean(),
            "micro_precision": 100 * p_mi[0], "micro_recall": 100 * r_mi[0], "micro_f1": 100 * f_mi[0]}


def compute_metrics(scores: np.ndarray, labels_true: np.ndarray, labels_obs: np.ndarray) -> dict[str, float]:
    """The original's per-phase metrics: map/rec@k/prec@k/top@k against clean and observed labels, plus
    preds_k_hat (mean sum of scores per image)."""
    checked, y_true = _check(scores, labels_true)
    ap_clean, ap_observed = _per_class_ap(checked, [y_true, _check(scores, labels_obs)[1]])
    out = {"map_clean": float(100.0 * ap_clean.mean()), "map_observed": float(100.0 * ap_observed.mean())}
    for variant, labels in (("clean", labels_true), ("observed", labels_obs)):
        out.update({f"{k}_{variant}": v for k, v in top_k_metrics(scores, labels).items()})
    out["preds_k_hat"] = float(np.mean(np.sum(scores, axis=1)))
    return out
