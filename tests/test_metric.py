import numpy as np
import pytest

import notebook as nb

T = nb.TARGET_GESTURES
N = nb.NON_TARGET_GESTURES


def test_perfect_prediction_scores_one():
    y = [T[0], T[1], N[0], N[3]]
    assert nb.competition_metric(y, y) == {"metric": 1.0, "binary_f1": 1.0, "macro_f1": 1.0}


def test_confusing_two_non_targets_costs_nothing():
    assert nb.competition_metric([N[0], N[1]], [N[1], N[2]])["metric"] == pytest.approx(0.0 + 0.5 * 1.0)
    # binary F1 has no positive at all (zero_division=0); macro over {non_target} = 1.


def test_hand_worked_case():
    # truth: A, A, B, nt ; pred: A, B, B, A   (A=T0, B=T1, nt=N0)
    y_true = [T[0], T[0], T[1], N[0]]
    y_pred = [T[0], T[1], T[1], T[0]]
    # binary: positives true = 3, predicted positive = 4, tp = 3 -> F1 = 6/7
    # macro over {A, B, non_target}: A tp1 fp1 fn1 -> 0.5 ; B tp1 fp1 fn0 -> 2/3 ; nt tp0 -> 0
    res = nb.competition_metric(y_true, y_pred)
    assert res["binary_f1"] == pytest.approx(6 / 7)
    assert res["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert res["metric"] == pytest.approx(0.5 * 6 / 7 + 0.5 * (0.5 + 2 / 3) / 3)


@pytest.mark.parametrize("n, seed", [(300, 0), (40, 1), (5, 2), (1, 3), (2000, 4)])
def test_matches_sklearn_definition(n, seed):
    """Bit for bit sklearn's f1_score (labels: the classes in truth or prediction, zero_division=0),
    small draws included, where classes are missing from one side or both."""
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(seed)
    y_true = list(rng.choice(nb.GESTURES, n))
    y_pred = list(rng.choice(nb.GESTURES, n))
    col = lambda g: g if g in T else "non_target"  # noqa: E731
    binary = f1_score([g in T for g in y_true], [g in T for g in y_pred], labels=[True], average=None,
                      zero_division=0)[0]
    labels = sorted({col(g) for g in y_true} | {col(g) for g in y_pred})
    macro = np.mean(f1_score([col(g) for g in y_true], [col(g) for g in y_pred], labels=labels, average=None,
                             zero_division=0))
    res = nb.competition_metric(y_true, y_pred)
    assert (res["binary_f1"], res["macro_f1"]) == (binary, macro)
    assert res["metric"] == 0.5 * binary + 0.5 * macro
    t, p = nb.label_index(y_true, nb.GESTURES), nb.label_index(y_pred, nb.GESTURES)
    per_class = f1_score(t, p, labels=list(range(18)), average=None, zero_division=0)
    assert nb.f1_per_class(t, p, 18).tolist() == per_class.tolist()


def test_prediction_outside_the_18_names_is_an_error():
    with pytest.raises(ValueError):
        nb.competition_metric([T[0]], ["text on phone"])


def _biased_probabilities(n=400, seed=0):
    """Every target sequence loses to a non-target gesture by a small margin; non-targets win clearly."""
    rng = np.random.default_rng(seed)
    targets = [nb.GESTURE_INDEX[g] for g in nb.TARGET_GESTURES]
    others = [nb.GESTURE_INDEX[g] for g in nb.NON_TARGET_GESTURES]
    y, p = [], np.full((n, 18), 0.01)
    for i in range(n):
        if i % 2 == 0:
            t = rng.choice(targets)
            p[i, t], p[i, rng.choice(others)] = 0.30, 0.35
        else:
            t = rng.choice(others)
            p[i, t], p[i, rng.choice(targets)] = 0.40, 0.30
        y.append(nb.GESTURES[t])
    return y, p / p.sum(1, keepdims=True), rng.integers(0, 4, n)


def test_target_scale_keeps_each_group_in_order_and_sums_to_one():
    _, p, _ = _biased_probabilities(50)
    q = nb.target_scaled(p, 1.5)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(nb.target_scaled(p, 1.0), p, rtol=1e-6)
    for mask in (nb.TARGET_MASK, ~nb.TARGET_MASK):
        assert (np.argsort(q[:, mask], 1, kind="stable") == np.argsort(p[:, mask], 1, kind="stable")).all()


def test_target_scale_is_fitted_when_it_helps_out_of_sample_and_off_when_not():
    y, p, folds = _biased_probabilities()
    check = nb.target_scale_check(y, p, folds)
    assert check["enabled"] and check["scale"] == 1.25 and check["gain"] > 0.1
    y_right = [nb.GESTURES[i] for i in p.argmax(1)]  # the same probabilities, already right
    assert not nb.target_scale_check(y_right, p, folds)["enabled"]
