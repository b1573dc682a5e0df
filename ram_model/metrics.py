"""Tagging quality: the one place the project computes AP, mAP, precision, recall and F1.

Used by the training loop's held-out evaluation, threshold calibration and the `evaluate` stage, so
a model's mAP in a report and in the evaluate stage come from the same code. AP is scikit-learn's
`average_precision_score` (tied scores are one threshold). A quantity with a zero denominator is
`None` for AP / mAP (undefined: no positives) and 0.0 for micro precision / recall / F1.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

Labels = Mapping[str, Iterable[str]]


def prf(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall and F1 of counts (0.0 where a denominator is zero), with the counts."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "tp": tp, "fp": fp, "fn": fn}


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class (scikit-learn's definition); ValueError when the class has no positives."""
    from sklearn.metrics import average_precision_score

    positives = np.asarray(positives).astype(bool)
    if not positives.any():
        raise ValueError("average_precision: the class has no positives; AP is undefined")
    return float(average_precision_score(positives, np.asarray(scores, dtype=np.float64)))


def _thresholds(thresholds, n_classes: int) -> np.ndarray:
    thr = np.asarray(thresholds, dtype=np.float64)
    if thr.ndim == 0:
        thr = np.full(n_classes, float(thr))
    if thr.shape != (n_classes,):
        raise ValueError(f"tagging_metrics: thresholds must be one float or {n_classes} values, got {thr.shape[0]} "
                         "thresholds")
    return thr


def tagging_metrics(scores: np.ndarray, targets: np.ndarray, thresholds: float | Sequence[float] | np.ndarray,
                    tags: Sequence[str] | None = None) -> dict:
    """Multi-label tagging metrics of [N, T] sigmoid scores against [N, T] 0/1 targets.

    A tag is predicted when its score is strictly above its threshold (as RAM's model predicts).
    mAP: mean AP over classes with at least one positive (None when no class has one).
    precision / recall / f1 / tp / fp / fn: micro, over all (sample, class) decisions.
    macro_precision / macro_recall: over classes with positives (a class never predicted counts 0).
    per_class lists hold None where a value is undefined; ap_by_tag is added when `tags` is given.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"tagging_metrics: scores {scores.shape} and targets {targets.shape} must both be "
                         "[N, T] (N samples, T tags)")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("tagging_metrics: targets must hold only 0 and 1")
    n, c = scores.shape
    if tags is not None and len(tags) != c:
        raise ValueError(f"tagging_metrics: {len(tags)} tag names for {c} score columns")
    targets = targets.astype(bool)
    pred = scores > _thresholds(thresholds, c)[None, :]
    tp = (pred & targets).sum(0)
    npred = pred.sum(0)
    npos = targets.sum(0)
    present = np.flatnonzero(npos > 0)
    ap = [average_precision(scores[:, j], targets[:, j]) if npos[j] else None for j in range(c)]
    prec = [float(tp[j] / npred[j]) if npred[j] else None for j in range(c)]
    rec = [float(tp[j] / npos[j]) if npos[j] else None for j in range(c)]
    out = prf(int(tp.sum()), int(npred.sum() - tp.sum()), int(npos.sum() - tp.sum()))
    out.update({
        "num_samples": n, "num_tags": c, "num_tags_present": len(present),
        "mAP": float(np.mean([ap[j] for j in present])) if len(present) else None,
        "macro_precision": float(np.mean([prec[j] or 0.0 for j in present])) if len(present) else None,
        "macro_recall": float(np.mean([rec[j] for j in present])) if len(present) else None,
        "per_class": {"ap": ap, "precision": prec, "recall": rec, "positives": npos.tolist(),
                      "predicted": npred.tolist(), "true_positives": tp.tolist()},
    })
    if tags is not None:
        out["ap_by_tag"] = dict(zip(tags, ap))
    return out


def precision_lower_bound(right: np.ndarray, predicted: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided lower confidence bound of a precision (right / predicted), by the Wilson score interval at
    `confidence` (0.5: the point estimate); 0.0 where nothing was predicted.

    Written out rather than scipy's `binomtest(k, n).proportion_ci(method="wilson")`, which gives the same
    bound (tests check it) one count at a time: calibration asks for every grid threshold of every class,
    19 x 4,585 bounds for RAM's tag list."""
    from scipy.stats import norm

    if not 0.5 <= confidence < 1:
        raise ValueError(f"precision_lower_bound: confidence must be in [0.5, 1), got {confidence}")
    z = float(norm.ppf(confidence))
    right = np.asarray(right, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    n = np.maximum(predicted, 1.0)
    p = right / n
    centre = p + z * z / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.where(predicted > 0, (centre - margin) / (1 + z * z / n), 0.0)


def best_f1_thresholds(scores: np.ndarray, targets: np.ndarray, current: Sequence[float], grid: np.ndarray,
                       min_precision: float, confidence: float = 0.5) -> list[float]:
    """Per class, the grid threshold with the best F1 among those whose precision reaches `min_precision`
    with `confidence` (by precision_lower_bound; 0.5 takes the precision as measured), ties to the higher
    threshold; 1.0 (disabled) for a class no threshold makes that precise; a class without positives keeps
    its `current` threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    grid = np.asarray(grid, dtype=np.float64)
    thresholds = np.asarray(current, dtype=np.float64).copy()
    for j in range(scores.shape[1]):
        if not targets[:, j].any():
            continue
        pred = scores[:, j][None, :] > grid[:, None]                      # [thresholds, samples]
        n_pred = pred.sum(1)
        tp = (pred & targets[:, j][None, :]).sum(1)
        f1 = 2 * tp / np.maximum(n_pred + targets[:, j].sum(), 1)
        precise = (precision_lower_bound(tp, n_pred, confidence) >= min_precision) & (n_pred > 0)
        if not precise.any():
            thresholds[j] = 1.0
            continue
        f1 = np.where(precise, f1, -1.0)
        thresholds[j] = float(grid[len(grid) - 1 - np.argmax(f1[::-1])])
    return thresholds.tolist()


def label_quality(pred: Labels, truth: Labels, keys: Iterable[str] | None = None,
                  groups: Mapping[str, Iterable[str]] | None = None) -> dict:
    """Micro precision / recall / F1 of predicted tag sets against the truth.

    Evaluated over `keys` (default: every key of the truth); a key without a prediction counts as
    an empty prediction. Prediction keys outside the truth are not scored; their number is
    reported as `keys_without_truth`. Returns precision, recall, f1, tp, fp, fn, n_keys,
    keys_without_truth, labels_per_key (mean predicted tags), per_tag {tag: {..., support}},
    macro_f1 (over tags with support or predictions), and per_group {group: micro scores}
    when `groups` ({name: tags}) is given.
    """
    keys = list(truth.keys()) if keys is None else list(keys)
    missing = [k for k in keys if k not in truth]
    if missing:
        raise KeyError(f"label_quality: {len(missing)} keys have no ground truth, e.g. {missing[:3]}")
    per: dict[str, list[int]] = {}
    n_pred = 0
    for k in keys:
        t = set(truth[k])
        p = set(pred.get(k, ()))
        n_pred += len(p)
        for tag in p | t:
            c = per.setdefault(tag, [0, 0, 0])
            c[0 if tag in p and tag in t else 1 if tag in p else 2] += 1
    out = prf(*(sum(c[i] for c in per.values()) for i in range(3)))
    out["n_keys"] = len(keys)
    out["keys_without_truth"] = sum(1 for k in pred if k not in truth)
    out["labels_per_key"] = n_pred / len(keys) if keys else 0.0
    out["per_tag"] = {tag: {**prf(*c), "support": c[0] + c[2]} for tag, c in sorted(per.items())}
    out["macro_f1"] = float(np.mean([v["f1"] for v in out["per_tag"].values()])) if per else 0.0
    if groups is not None:
        out["per_group"] = {}
        for name, tags in groups.items():
            cs = [per.get(t, [0, 0, 0]) for t in tags]
            out["per_group"][name] = prf(*(sum(c[i] for c in cs) for i in range(3)))
    return out
