"""Leaderboard from arena votes: Bradley-Terry ratings on the Elo scale, bootstrap intervals, win rates.

Model: P(i beats j) = sigmoid(theta_i - theta_j), fitted by maximum likelihood (L-BFGS on the
convex negative log-likelihood with a tiny L2 prior that fixes the free shift and keeps a
model that never lost finite). Reported rating = 1000 + (400 / ln 10) * theta, shifted so the
mean over rated models is 1000, or so a named anchor model is exactly 1000; 400 points of gap
= 10:1 odds, as in Elo and Chatbot Arena.
A tie counts half a win for each side. "both_bad" is a tie by default (as Chatbot Arena does
with "tie (bothbad)": neither image was preferred, which is evidence they are close);
`both_bad="exclude"` drops those votes from the fit instead. They are counted in `battles` either way.
Intervals: resample the votes with replacement (seeded), refit, anchor each refit the same way,
take the 2.5 / 97.5 percentiles.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

ELO_SCALE = 400.0 / math.log(10.0)     # natural-log strength -> Elo points
BASE_RATING = 1000.0
SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}   # side A's score


def _battles(votes: Iterable[Mapping], models: Sequence[str] | None, both_bad: str):
    """(names, index of A, index of B, A's score, every vote's (a, b, outcome)) for the fit."""
    if both_bad not in ("tie", "exclude"):
        raise ValueError(f"both_bad must be 'tie' or 'exclude', got {both_bad!r}")
    all_votes = [(str(v["model_a"]), str(v["model_b"]), v["outcome"]) for v in votes]
    for a, b, outcome in all_votes:
        if outcome not in SCORE:
            raise ValueError(f"unknown outcome {outcome!r} in battle {a} vs {b}")
    seen = sorted({m for a, b, _ in all_votes for m in (a, b)})
    names = list(dict.fromkeys(list(models or []) + seen))
    index = {m: i for i, m in enumerate(names)}
    used = [(a, b, o) for a, b, o in all_votes if not (o == "both_bad" and both_bad == "exclude")]
    ia = np.array([index[a] for a, _, _ in used], dtype=np.int64)
    ib = np.array([index[b] for _, b, _ in used], dtype=np.int64)
    score = np.array([SCORE[o] for _, _, o in used], dtype=np.float64)
    return names, ia, ib, score, all_votes


FLAG_VOTES_PER_HOUR_ENV = "DMD2_FLAG_VOTES_PER_HOUR"
FLAG_SAME_SIDE_ENV = "DMD2_FLAG_SAME_SIDE"
HOUR_S = 3600.0
REASONS = {                     # exclusion reason -> how the Leaderboard says it (formatted with the threshold)
    "votes_per_hour": "more than {} votes in an hour",
    "same_side": "the same side in every vote (at least {} votes)",
}


def screening_from_env(per_hour: int = 120, same_side: int = 20) -> dict:
    """`screen_votes` thresholds: $DMD2_FLAG_VOTES_PER_HOUR (default 120) and $DMD2_FLAG_SAME_SIDE (default 20
    votes); 0 turns a test off."""
    import os

    out = {}
    for key, env, default in (("max_per_hour", FLAG_VOTES_PER_HOUR_ENV, per_hour),
                              ("same_side_min", FLAG_SAME_SIDE_ENV, same_side)):
        raw = os.environ.get(env, "").strip()
        try:
            value = int(raw) if raw else default
        except ValueError:
            raise ValueError(f"{env}={raw!r} must be a whole number of votes (0: off)") from None
        if value < 0:
            raise ValueError(f"{env}={raw!r} must be >= 0 (0: off)")
        out[key] = value or None
    return out


def screen_votes(votes: Iterable[Mapping], max_per_hour: int | None = 120,
                 same_side_min: int | None = 20) -> tuple[list[Mapping], dict[str, dict]]:
    """(kept votes, exclusions): the votes of flagged voters left out, and how many, and why.

    A voter is a vote's `client_hash` (a logged-in user's hashed id, else its session's). Flagged:
    `votes_per_hour`, more than `max_per_hour` votes within some hour (`created_at`, seconds); else
    `same_side`, at least `same_side_min` votes all "a" or all "b" (a voter who does not look at the
    images). None turns a test off. Every vote of a flagged voter is excluded; votes without a
    client_hash are kept. `exclusions`: {reason: {"voters", "votes", "threshold"}} for both reasons
    (a voter flagged by both counts under votes_per_hour only). Pure: no I/O, the input is not changed.
    """
    votes = list(votes)
    by_voter: dict[str, list[Mapping]] = {}
    for v in votes:
        if v.get("client_hash"):
            by_voter.setdefault(str(v["client_hash"]), []).append(v)
    flagged: dict[str, str] = {}
    for voter, mine in by_voter.items():
        if max_per_hour is not None and len(mine) > max_per_hour:
            times = sorted(float(v["created_at"]) for v in mine)
            start = 0
            for end, t in enumerate(times):
                while t - times[start] >= HOUR_S:
                    start += 1
                if end - start + 1 > max_per_hour:
                    flagged[voter] = "votes_per_hour"
                    break
        if voter not in flagged and same_side_min is not None and len(mine) >= same_side_min:
            sides = {v["outcome"] for v in mine}
            if sides in ({"a"}, {"b"}):
                flagged[voter] = "same_side"
    exclusions = {reason: {"voters": 0, "votes": 0, "threshold": t}
                  for reason, t in (("votes_per_hour", max_per_hour), ("same_side", same_side_min))}
    for voter, reason in flagged.items():
        exclusions[reason]["voters"] += 1
        exclusions[reason]["votes"] += len(by_voter[voter])
    kept = [v for v in votes if str(v.get("client_hash") or "") not in flagged]
    return kept, exclusions


def exclusion_line(total: int, exclusions: Mapping[str, Mapping]) -> str:
    """One line for under the leaderboard: how many of `total` votes count, and how many were left out why."""
    parts = [f"{e['votes']} from {e['voters']} voter{'s' if e['voters'] != 1 else ''} with "
             + REASONS[reason].format(e["threshold"]) for reason, e in exclusions.items() if e["votes"]]
    excluded = sum(e["votes"] for e in exclusions.values())
    if not excluded:
        return f"All {total} votes counted; none excluded."
    return f"Counted {total - excluded} of {total} votes; excluded {excluded}: " + "; ".join(parts) + "."


def _wins_matrix(k: int, ia, ib, score, weight=None) -> np.ndarray:
    """W[i, j] = (weighted) number of wins of i over j, ties counted half to each."""
    w = np.ones_like(score) if weight is None else weight
    W = np.zeros((k, k))
    np.add.at(W, (ia, ib), w * score)
    np.add.at(W, (ib, ia), w * (1.0 - score))
    return W


def _fit_theta(W: np.ndarray, l2: float, theta0: np.ndarray | None = None) -> np.ndarray:
    """Maximum-likelihood Bradley-Terry strengths (natural-log units) for a wins matrix."""

    def nll(theta):
        diff = theta[:, None] - theta[None, :]                      # theta_i - theta_j
        loss = np.sum(W * np.logaddexp(0.0, -diff)) + 0.5 * l2 * theta @ theta
        M = W * (0.5 - 0.5 * np.tanh(0.5 * diff))                   # W_ij * sigmoid(theta_j - theta_i)
        return loss, -(M.sum(1) - M.sum(0)) + l2 * theta

    x0 = np.zeros(len(W)) if theta0 is None else theta0
    res = minimize(nll, x0, jac=True, method="L-BFGS-B", options=dict(maxiter=1000, gtol=1e-9))
    return res.x


def _anchored(theta: np.ndarray, rated: np.ndarray, anchor_idx: int | None) -> np.ndarray:
    """Elo-scale ratings with the rated models' mean (or the anchor model) at 1000; unrated -> NaN."""
    elo = ELO_SCALE * theta
    ref = elo[anchor_idx] if anchor_idx is not None else elo[rated].mean()
    return np.where(rated, elo - ref + BASE_RATING, np.nan)


def leaderboard(votes: Iterable[Mapping], models: Sequence[str] | None = None, anchor: str | None = None,
                rounds: int = 1000, seed: int = 0, both_bad: str = "tie", l2: float = 1e-3) -> list[dict]:
    """Ratings with 95% bootstrap intervals and battle counts, one dict per model, best first.

    `models` adds models that may have no votes yet (listed last, rating None). Each dict:
    model, rating, ci_low, ci_high, rank, battles, wins, losses, ties, both_bad. `rank` is
    1 + the number of models whose whole interval lies above this one's (Chatbot Arena style;
    with rounds=0, 1 + the number of models rated higher).
    Same as `with_intervals(leaderboard(..., rounds=0), rating_intervals(...))`, which lets a caller
    show the point ratings first and add the (slower) intervals later.
    """
    votes = list(votes)
    rows = _point_rows(votes, models, anchor, both_bad, l2)
    if rounds <= 0:
        return rows
    return with_intervals(rows, rating_intervals(votes, models, anchor, rounds, seed, both_bad, l2))


def _fit(votes: list[Mapping], models, anchor, both_bad, l2):
    """The point fit: (names, battle arrays, every vote, rated mask, anchor index, theta or None, ratings)."""
    names, ia, ib, score, all_votes = _battles(votes, models, both_bad)
    k = len(names)
    rated = np.zeros(k, dtype=bool)
    rated[ia], rated[ib] = True, True
    anchor_idx = None
    if anchor is not None:
        if anchor not in names or not rated[names.index(anchor)]:
            raise ValueError(f"anchor model {anchor!r} has no counted battles; cannot anchor on it")
        anchor_idx = names.index(anchor)
    theta, ratings = None, np.full(k, np.nan)
    if rated.any():
        theta = _fit_theta(_wins_matrix(k, ia, ib, score), l2)
        ratings = _anchored(theta, rated, anchor_idx)
    return names, ia, ib, score, all_votes, anchor_idx, theta, ratings


def _point_rows(votes, models, anchor, both_bad, l2) -> list[dict]:
    """Point ratings and battle counts, no intervals (ci_low = ci_high = None), best first."""
    names, _, _, _, all_votes, _, _, ratings = _fit(votes, models, anchor, both_bad, l2)
    rows = []
    for i, m in enumerate(names):
        mine = [(a == m, o) for a, b, o in all_votes if m in (a, b)]
        wins = sum(o == ("a" if is_a else "b") for is_a, o in mine)
        losses = sum(o == ("b" if is_a else "a") for is_a, o in mine)
        rows.append(dict(model=m, rating=_num(ratings[i]), ci_low=None, ci_high=None,
                         rank=None, battles=len(mine), wins=wins, losses=losses,
                         ties=sum(o == "tie" for _, o in mine), both_bad=sum(o == "both_bad" for _, o in mine)))
    return _ranked(rows)


def rating_intervals(votes: Iterable[Mapping], models: Sequence[str] | None = None, anchor: str | None = None,
                     rounds: int = 1000, seed: int = 0, both_bad: str = "tie",
                     l2: float = 1e-3) -> dict[str, tuple[float | None, float | None]]:
    """95% bootstrap intervals of the ratings: model -> (low, high), (None, None) for a model without votes.

    Resample the votes with replacement `rounds` times (seeded), refit, anchor each refit as the
    point fit is anchored, take the 2.5 / 97.5 percentiles. The slow part of a leaderboard.
    """
    names, ia, ib, score, _, anchor_idx, theta, _ = _fit(list(votes), models, anchor, both_bad, l2)
    k = len(names)
    low, high = np.full(k, np.nan), np.full(k, np.nan)
    if theta is not None and rounds > 0:
        low, high = _bootstrap(k, ia, ib, score, theta, anchor_idx, rounds, seed, l2)
    return {m: (_num(low[i]), _num(high[i])) for i, m in enumerate(names)}


def with_intervals(rows: Sequence[Mapping], intervals: Mapping[str, tuple]) -> list[dict]:
    """`rows` of `leaderboard(..., rounds=0)` with ci_low / ci_high from `intervals` (of `rating_intervals`)
    and the ranks recomputed from them; a model missing from `intervals` keeps no interval."""
    out = []
    for r in rows:
        low, high = intervals.get(r["model"], (None, None))
        rated = r["rating"] is not None
        out.append(dict(r, ci_low=low if rated else None, ci_high=high if rated else None, rank=None))
    return _ranked(out)


def _ranked(rows: list[dict]) -> list[dict]:
    """Ranks filled in (1 + the number of models whose interval lies wholly above), sorted best first."""
    def bound(r, key):              # without an interval it shrinks to the rating
        return r[key] if r[key] is not None else r["rating"]

    for r in rows:
        if r["rating"] is not None:
            r["rank"] = 1 + sum(o["rating"] is not None and bound(o, "ci_low") > bound(r, "ci_high") for o in rows)
    return sorted(rows, key=lambda r: (r["rating"] is None, -(r["rating"] or 0.0), r["model"]))


def _bootstrap(k, ia, ib, score, theta, anchor_idx, rounds, seed, l2):
    """2.5 / 97.5 percentiles of anchored ratings over `rounds` resamples of the battles."""
    rng = np.random.default_rng(seed)
    n = len(score)
    samples = np.full((rounds, k), np.nan)
    for r in range(rounds):
        weight = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
        present = np.zeros(k, dtype=bool)
        present[ia[weight > 0]], present[ib[weight > 0]] = True, True
        if anchor_idx is not None and not present[anchor_idx]:
            continue                                   # this resample cannot be anchored
        t = _fit_theta(_wins_matrix(k, ia, ib, score, weight), l2, theta0=theta)
        samples[r] = _anchored(t, present, anchor_idx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)        # all-NaN columns: unrated models
        return np.nanpercentile(samples, 2.5, axis=0), np.nanpercentile(samples, 97.5, axis=0)


def _num(x: float) -> float | None:
    """A plain float, or None for NaN (JSON- and table-friendly)."""
    return None if x is None or np.isnan(x) else float(x)


def win_rate_matrix(votes: Iterable[Mapping], models: Sequence[str] | None = None,
                    both_bad: str = "tie") -> tuple[np.ndarray, list[str]]:
    """M[i, j] = share of i-vs-j battles won by i (ties half); NaN on the diagonal and for unplayed pairs.

    Order: `models` first (pass the leaderboard's order), then any other voted model by name.
    """
    names, ia, ib, score, _ = _battles(votes, models, both_bad)
    k = len(names)
    W = _wins_matrix(k, ia, ib, score)
    played = W + W.T
    with np.errstate(invalid="ignore", divide="ignore"):
        M = np.where(played > 0, W / played, np.nan)
    np.fill_diagonal(M, np.nan)
    return M, names


def win_rate_plot(matrix: np.ndarray, names: Sequence[str]):
    """A matplotlib Figure of the win-rate matrix (row beats column), ready for gr.Plot."""
    import matplotlib
    from matplotlib.figure import Figure     # no pyplot: no global state, safe in server threads

    k = len(names)
    size = 1.2 + 0.7 * k
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#dddddd")     # unplayed pairs in grey
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("opponent")
    ax.set_ylabel("model")
    ax.set_title("Win rate of the row model against the column model\n(either side; ties count half)", fontsize=10)
    for i in range(k):
        for j in range(k):
            if not np.isnan(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.0%}", ha="center", va="center",
                        color="white" if abs(matrix[i, j] - 0.5) > 0.3 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def win_rate_png(matrix: np.ndarray, names: Sequence[str]) -> bytes:
    """`win_rate_plot` rendered as PNG bytes (for a process that shows the plot without drawing it)."""
    import io

    buffer = io.BytesIO()
    win_rate_plot(matrix, names).savefig(buffer, format="png")
    return buffer.getvalue()
