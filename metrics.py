"""Evaluation metrics. Labels are binarised as (label == 1): negative pseudo-labels and -1 count as negatives.

mAP follows the original: scikit-learn's average precision per class (non-interpolated), 0 for a class
without positives (still included in the mean), mean x 100. It is computed here by scikit-learn's own steps,
each column sorted once (numpy's argsort) for the clean and the observed labels: the same bits, about 12 times
faster on COCO's sizes (tests/test_metrics.py compares with `average_precision_score` by equality;
`python bench/map_speed.py` times both).
"""
from __future__ import annotations

import numpy as np

TOP_K = (1, 3, 5)
THRESHOLDS = (0.5, 0.75)  # 0.75 is what Zhou et al. recommend for EM models (paper, Appendix E)


def _binarise(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels) == 1


def _check(scores: np.ndarray, labels: np.ndarray, keep_float32: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scores as float64 (scikit-learn's dtype; `keep_float32`: float32 ones stay float32, which orders and ties
    them the same, for the sorts) and labels binarised; ValueError for a shape mismatch or a non-finite score."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if not (keep_float32 and scores.dtype == np.float32):
        scores = scores.astype(np.float64, copy=False)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must be (N, C) of one shape, got {scores.shape} and {labels.shape}")
    if not np.isfinite(scores).all():  # as scikit-learn's check
        raise ValueError("scores contain NaN or infinity")
    return scores, _binarise(labels)


def per_class_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Average precision of each class (fraction in [0, 1]); 0 for a class without positives."""
    scores, y = _check(scores, labels, keep_float32=True)
    return _per_class_ap(scores, [y])[0]


def _per_class_ap(scores: np.ndarray, label_sets: list[np.ndarray]) -> list[np.ndarray]:
    """scikit-learn's `average_precision_score` of every column, for each boolean label matrix of `label_sets`,
    by the same operations (so the same bits, tests/test_metrics.py): scores sorted descending, one threshold per
    distinct score, precision = TP / (TP + FP), recall = TP / P, AP = -sum(diff(recall) * precision) over the
    curve with (recall 0, precision 1) appended. Each column is sorted once (numpy's argsort) for all the label
    sets (the clean and the observed labels), which is where scikit-learn spends its time on large sets; the order
    inside a run of equal scores never reaches the AP, which reads the cumulative counts only at the end of each
    run (the thresholds), so any sort gives scikit-learn's bits, and float32 scores sort as their float64 values.
    On COCO's sizes (65,665 / 16,416 / 40,137 x 80, clean and observed labels) it takes 0.12 / 0.03 / 0.06 s of
    CPU where `average_precision_score` column by column takes 1.50 / 0.31 / 0.73 s (`python bench/map_speed.py`,
    commit 05a94e1, quiet 2-core CPU VM)."""
    by_class = np.ascontiguousarray(scores.T)  # each class's values contiguous
    labels_by_class = [np.ascontiguousarray(y.T) for y in label_sets]
    count_dtype = np.int32 if scores.shape[0] < 2 ** 31 else np.int64
    per_class = [np.zeros(scores.shape[1], dtype=np.float64) for _ in label_sets]  # a class without positives: 0
    for c in range(scores.shape[1]):
        present = [i for i, y in enumerate(labels_by_class) if y[c].any()]
        if not present:
            continue
        order = np.argsort(by_class[c])[::-1]
        ranked = by_class[c][order]
        thresholds = np.r_[np.flatnonzero(ranked[1:] != ranked[:-1]), len(ranked) - 1]  # each distinct score's last row
        predicted = (1 + thresholds).astype(np.float64)  # TP + FP (scikit-learn's float sum is exact: integers)
        for i in present:
            # TP counts: an integer cumsum (~10x faster than scikit-learn's float64 one), then float64: the same
            # exact integers
            tps = np.cumsum(labels_by_class[i][c][order], dtype=count_dtype)[thresholds].astype(np.float64)
            precision, recall = tps / predicted, tps / tps[-1]
            # scikit-learn reverses the curve, appends (recall 0, precision 1) and sums diff(recall) *
            # precision[:-1]; the same products in the same order, without the appended copies
            steps = np.empty_like(recall)
            np.subtract(recall[-2::-1], recall[:0:-1], out=steps[:-1])
            steps[-1] = 0.0 - recall[0]  # 0 - r, as diff computes it
            steps *= precision[::-1]
            per_class[i][c] = max(0.0, -np.sum(steps))
    return per_class


def compute_map(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean average precision in percent (a class without positives counts 0)."""
    return float(100.0 * per_class_ap(scores, labels).mean())


def top_k_metrics(scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = TOP_K) -> dict[str, float]:
    """prec@k = hits/k, rec@k = hits/#positives (0 without positives), top@k = share of images with a hit,
    averaged over images; hits = true positives among the k highest scores."""
    scores, y = _check(scores, labels, keep_float32=True)
    return _top_k(_top_k_selections(scores, ks), y)


def _top_k_selections(scores: np.ndarray, ks: tuple[int, ...]) -> dict[int, np.ndarray]:
    """For each k, the boolean (N, C) mask of every row's k highest scores, with ties broken as the original's
    reversed argsort (`np.argsort(scores, axis=1)[:, ::-1][:, :k]`). Where the k-th and the (k+1)-th highest
    scores of a row differ, the k highest are those at least the k-th whatever the sort; only the rows with a
    tie there are argsorted (each row's argsort depends on that row alone)."""
    num_classes = scores.shape[1]
    ascending = np.sort(scores, axis=1)
    selections = {}
    for k in ks:
        if k >= num_classes:  # the slice takes every column
            selections[k] = np.ones(scores.shape, dtype=bool)
            continue
        kth = ascending[:, num_classes - k]
        selected = scores >= kth[:, None]
        tied = np.flatnonzero(kth == ascending[:, num_classes - k - 1])
        if len(tied):
            top = np.argsort(scores[tied].astype(np.float64), axis=1)[:, ::-1][:, :k]  # (the original's dtype)
            selected[tied] = False
            selected[tied[:, None], top] = True
        selections[k] = selected
    return selections


def _top_k(selections: dict[int, np.ndarray], y: np.ndarray) -> dict[str, float]:
    num_pos = y.sum(axis=1)
    out = {}
    for k, selected in selections.items():
        hits = (y & selected).sum(axis=1)
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
    preds_k_hat (mean sum of scores per image). The scores are sorted once for both label sets."""
    checked, y_true = _check(scores, labels_true, keep_float32=True)
    y_obs = _check(checked, labels_obs, keep_float32=True)[1]
    ap_clean, ap_observed = _per_class_ap(checked, [y_true, y_obs])
    out = {"map_clean": float(100.0 * ap_clean.mean()), "map_observed": float(100.0 * ap_observed.mean())}
    selections = _top_k_selections(checked, TOP_K)
    for variant, y in (("clean", y_true), ("observed", y_obs)):
        out.update({f"{k}_{variant}": v for k, v in _top_k(selections, y).items()})
    # in float64, as the original, whose logger turns the float32 scores into Python floats first (in float32 the
    # sums differ in their last bits: docs/original.md "Paired runs against the sources")
    out["preds_k_hat"] = float(np.mean(np.sum(np.asarray(scores, dtype=np.float64), axis=1)))
    return out
