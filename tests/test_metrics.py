"""Tests for metrics.py: hand-computed AP / top-k values, scikit-learn as an independent oracle.

Reference: docs/original.md §8 (labels binarised as == 1, AP = sklearn's
average_precision_score per class, 0 for a class without positives but still in the mean, map x 100).
"""
from __future__ import annotations


import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from conftest import REALDATA, ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

from metrics import compute_map, compute_metrics, per_class_ap, threshold_metrics, top_k_metrics  # noqa: E402


def col(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1, 1)


# ------------------------------------------------------------------------------------------------------------
# AP / mAP


def test_ap_hand_example():
    # ranks 1 and 3 are positive: precision 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    scores, labels = col([0.9, 0.8, 0.7, 0.6]), col([1, 0, 1, 0])
    assert per_class_ap(scores, labels)[0] == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)
    assert compute_map(scores, labels) == pytest.approx(100 * (1 + 2 / 3) / 2, abs=1e-9)


def test_ap_hand_example_positives_last():
    # positives at ranks 2 and 4: precision 1/2 and 2/4 -> AP = 0.5
    assert per_class_ap(col([0.9, 0.8, 0.7, 0.6]), col([0, 1, 0, 1]))[0] == pytest.approx(0.5, abs=1e-12)
    # single positive at rank 3 -> AP = 1/3
    assert per_class_ap(col([0.9, 0.8, 0.7, 0.6]), col([0, 0, 1, 0]))[0] == pytest.approx(1 / 3, abs=1e-12)


def test_class_without_positives_counts_zero_in_mean():
    scores = np.array([[0.9, 0.2], [0.1, 0.8], [0.3, 0.4]])
    labels = np.array([[1, 0], [0, 0], [0, 0]])  # class 0 perfect (AP 1), class 1 has no positives
    np.testing.assert_allclose(per_class_ap(scores, labels), [1.0, 0.0], atol=1e-12)
    assert compute_map(scores, labels) == pytest.approx(50.0, abs=1e-9)


def test_pseudo_label_values_and_minus_one_are_negatives():
    scores = col([0.9, 0.8, 0.7, 0.6])
    # -0.3 (a soft negative pseudo-label) and -1 count as negatives: same as [1, 0, 1, 0]
    assert compute_map(scores, col([1, -0.3, 1, -1])) == pytest.approx(100 * (1 + 2 / 3) / 2, abs=1e-9)
    # a column with only -1 / -0.3 / 0 has no positives -> AP 0
    assert per_class_ap(scores, col([-1, -0.3, 0, -0.05]))[0] == 0.0


def test_map_matches_sklearn_per_class_on_random_data():
    rng = np.random.RandomState(0)
    n, c = 60, 7
    scores = rng.rand(n, c)
    labels = (rng.rand(n, c) < 0.3).astype(np.float64)
    labels[0, :] = 1  # every class has at least one positive
    labels[:, 5] = 0  # ... except class 5
    scores[:, 3] = np.round(scores[:, 3], 1)  # ties in one class
    expected_ap = []
    for j in range(c):
        if labels[:, j].sum() == 0:
            expected_ap.append(0.0)
        else:
            expected_ap.append(average_precision_score(labels[:, j], scores[:, j]))
    np.testing.assert_allclose(per_class_ap(scores, labels), expected_ap, rtol=1e-12, atol=1e-12)
    assert compute_map(scores, labels) == pytest.approx(100 * np.mean(expected_ap), rel=1e-12)


@pytest.mark.parametrize("seed,n,c,decimals,dtype", [(0, 200, 9, None, np.float32), (1, 1000, 20, 2, np.float32),
                                                      (2, 3000, 5, 1, np.float64), (3, 50, 4, None, np.float64),
                                                      (4, 20000, 3, 3, np.float32)])
def test_per_class_ap_is_sklearns_to_the_bit(seed, n, c, decimals, dtype):
    """The same bits as average_precision_score, column by column: ties, all-equal scores, a class without
    positives, one where every row is positive, float32 and float64 scores; and for the observed labels that
    compute_metrics scores from the same sort."""
    rng = np.random.RandomState(seed)
    scores = rng.rand(n, c)
    if decimals is not None:
        scores = np.round(scores, decimals)
    scores = scores.astype(dtype)
    scores[:, 0] = 0.5  # a column of one value: a single threshold
    labels = (rng.rand(n, c) < 0.2).astype(np.float64)
    labels[:, 1] = 0  # no positives: 0
    labels[:, -1] = 1  # all positive: 1
    labels[rng.randint(n), 0] = 1
    expected = np.array([average_precision_score(labels[:, j], scores[:, j].astype(np.float64)) if labels[:, j].any()
                         else 0.0 for j in range(c)])
    assert np.array_equal(per_class_ap(scores, labels), expected)
    observed = np.zeros_like(labels)
    observed[np.arange(n), rng.randint(c, size=n)] = 1
    metrics = compute_metrics(scores, labels, observed)
    assert metrics["map_clean"] == float(100.0 * expected.mean())
    expected_obs = [average_precision_score(observed[:, j], scores[:, j].astype(np.float64)) if observed[:, j].any()
                    else 0.0 for j in range(c)]
    assert metrics["map_observed"] == float(100.0 * np.mean(expected_obs))


@pytest.mark.parametrize("seed,n,decimals", [(5, 70000, None), (6, 3000, 1), (7, 500, 0)])
def test_float32_scores_are_sklearns_to_the_bit(seed, n, decimals):
    """float32 scores sorted as they are: negative scores (logits), -0.0 beside 0.0 (equal: one
    threshold), ties, more rows than 2^16; the bits must stay scikit-learn's."""
    rng = np.random.RandomState(seed)
    c = 4
    scores = rng.randn(n, c) * 3
    if decimals is not None:
        scores = np.round(scores, decimals)
    scores = scores.astype(np.float32)
    scores[: n // 10, 1] = np.where(rng.rand(n // 10) < 0.5, np.float32(-0.0), np.float32(0.0))
    labels = (rng.rand(n, c) < 0.1).astype(np.float64)
    labels[0] = 1
    expected = np.array([average_precision_score(labels[:, j], scores[:, j].astype(np.float64)) for j in range(c)])
    assert np.array_equal(per_class_ap(scores, labels), expected)


def test_map_shape_mismatch_raises():
    with pytest.raises(ValueError):
        compute_map(np.zeros((3, 2)), np.zeros((3, 3)))


# ------------------------------------------------------------------------------------------------------------
# top-k


def test_top_k_hand_example():
    scores = np.array([
        [0.9, 0.1, 0.8, 0.3, 0.5, 0.7],   # order: 0, 2, 5, 4, 3, 1   positives {0, 3}
        [0.2, 0.6, 0.1, 0.9, 0.4, 0.3],   # order: 3, 1, 4, 5, 0, 2   positive {5} at rank 4
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # no positives
    ])
    labels = np.array([
        [1, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0],
    ])
    m = top_k_metrics(scores, labels)
    # image 0: hits@1 = 1, hits@3 = 1, hits@5 = 2 (of 2 positives); image 1: 0, 0, 1 (of 1); image 2: 0, 0, 0
    assert m["prec_at_1"] == pytest.approx((1 + 0 + 0) / 3)
    assert m["rec_at_1"] == pytest.approx((1 / 2 + 0 + 0) / 3)
    assert m["top_1"] == pytest.approx(1 / 3)
    assert m["prec_at_3"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert m["rec_at_3"] == pytest.approx((1 / 2 + 0 + 0) / 3)
    assert m["top_3"] == pytest.approx(1 / 3)
    assert m["prec_at_5"] == pytest.approx((2 / 5 + 1 / 5 + 0) / 3)
    assert m["rec_at_5"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["top_5"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_equals_the_original_reversed_argsort_with_ties(dtype):
    """The k highest of each row as the original picks them (reversed argsort of float64 scores), on scores with
    many ties across the k-th place, and k = the number of classes and more."""
    rng = np.random.RandomState(3)
    n, c = 4000, 6
    scores = np.round(rng.rand(n, c), 1).astype(dtype)
    labels = (rng.rand(n, c) < 0.3).astype(np.float64)
    ks = (1, 2, 3, 5, 6, 8)
    order = np.argsort(scores.astype(np.float64), axis=1)[:, ::-1]
    y = labels == 1
    num_pos = y.sum(axis=1)
    expected = {}
    for k in ks:
        hits = np.take_along_axis(y, order[:, :k], axis=1).sum(axis=1)
        expected[f"prec_at_{k}"] = float(np.mean(hits / k))
        expected[f"rec_at_{k}"] = float(np.mean(np.divide(hits, num_pos, out=np.zeros(n), where=num_pos > 0)))
        expected[f"top_{k}"] = float(np.mean(hits > 0))
    assert top_k_metrics(scores, labels, ks=ks) == expected
    assert (scores[:, None, :] == np.sort(scores, axis=1)[:, -3:-1, None]).any()  # ties at the cut do occur


def test_top_k_pseudo_labels_are_not_hits():
    scores = np.array([[0.9, 0.8, 0.1]])
    labels = np.array([[-0.4, -1.0, 1.0]])
    m = top_k_metrics(scores, labels, ks=(1, 3))
    assert m["prec_at_1"] == 0.0 and m["top_1"] == 0.0
    assert m["prec_at_3"] == pytest.approx(1 / 3) and m["rec_at_3"] == 1.0


# ------------------------------------------------------------------------------------------------------------
# thresholded P / R / F1


def _sklearn_prf(scores, labels, threshold):
    y = (labels == 1).astype(int)
    pred = (scores >= threshold).astype(int)
    out = {}
    for avg in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        out.update({f"{avg}_precision": 100 * p, f"{avg}_recall": 100 * r, f"{avg}_f1": 100 * f})
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.75])
@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_metrics_match_sklearn(threshold, seed):
    rng = np.random.RandomState(seed)
    n, c = 40, 6
    scores = np.round(rng.rand(n, c), 2)
    scores[:5, :] = threshold  # exactly at the threshold counts as predicted positive (>=)
    labels = (rng.rand(n, c) < 0.35).astype(np.float64)
    labels[:, 4] = 0        # a class without positives (recall 0 by convention)
    scores[:, 5] = 0.01     # a class without predicted positives (precision 0 by convention)
    labels[3, 2] = -0.5     # a pseudo-label value is a negative
    got = threshold_metrics(scores, labels, threshold)
    expected = _sklearn_prf(scores, labels, threshold)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_threshold_is_inclusive_hand_example():
    scores = np.array([[0.75], [0.74], [0.9], [0.2]])
    labels = np.array([[1], [1], [0], [0]])
    m = threshold_metrics(scores, labels, 0.75)
    # predicted positive: rows 0 and 2 -> tp 1, fp 1, fn 1
    assert m["macro_precision"] == pytest.approx(50.0)
    assert m["macro_recall"] == pytest.approx(50.0)
    assert m["micro_f1"] == pytest.approx(50.0)


# ------------------------------------------------------------------------------------------------------------
# compute_metrics


def test_compute_metrics_clean_and_observed():
    scores = np.array([[0.9, 0.2, 0.6], [0.3, 0.8, 0.1], [0.6, 0.7, 0.4]])
    true = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    obs = np.array([[1, 0, -0.2], [0, 1, 0], [0, 0, 0]])
    m = compute_metrics(scores, true, obs)
    exp_clean = np.mean([average_precision_score(true[:, j], scores[:, j]) for j in range(3)])
    # obs column 2 has no positives -> 0
    exp_obs = (average_precision_score(obs[:, 0] == 1, scores[:, 0])
               + average_precision_score(obs[:, 1] == 1, scores[:, 1]) + 0.0) / 3
    assert m["map_clean"] == pytest.approx(100 * exp_clean)
    assert m["map_observed"] == pytest.approx(100 * exp_obs)
    assert m["preds_k_hat"] == pytest.approx((1.7 + 1.2 + 1.7) / 3)
    assert m["prec_at_1_clean"] == pytest.approx(1.0)      # argmax of every row is a true positive
    assert m["prec_at_1_observed"] == pytest.approx(2 / 3)  # row 2's argmax (class 1) is unobserved


def test_top_k_ties_are_broken_like_the_original_reversed_argsort():
    # np.argsort([.5, .5, .1]) = [2, 0, 1]; reversed, the first of the tied pair taken is index 1.
    out = top_k_metrics(np.array([[0.5, 0.5, 0.1]]), np.array([[1, 0, 0]]), ks=(1,))
    assert out["prec_at_1"] == 0.0 and out["top_1"] == 0.0


def test_preds_k_hat_is_the_originals_float64_mean_of_float32_scores():
    # the original's logger keeps each score as a Python float (rows of .tolist()), then np.mean(np.sum(., 1)):
    # float64 sums; float32 ones differ in the last bits (seen in the paired run against Cole et al.'s loop)
    rng = np.random.default_rng(0)
    scores = rng.random((203, 12), dtype=np.float32)
    labels = (rng.random((203, 12)) < 0.2).astype(np.float64)
    original = np.mean(np.sum(np.array([row.tolist() for row in scores]), axis=1))
    assert compute_metrics(scores, labels, labels)["preds_k_hat"] == original
    assert float(np.mean(np.sum(scores, axis=1))) != original  # (float32 sums: the project's former bits)
