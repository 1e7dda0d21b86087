"""Cache value c^r (the paper's Eq. 5), the below-mean eviction rule and the per-scope size cap, shared
by the stores (and, for the first two, the policy simulator) so that they age entries identically.

The paper keeps, per cached entry, a use count c^f and a cache value c^r that rises when the entry is
useful and decays when it is not; every xi requests, entries whose value is below the mean are dropped.
Our reading, written down so it can be tested and tuned:

    c^f <- c^f + 1
    c^r <- (1 - eta) * c^r + eta * outcome          (Eq. 5, exponential moving average)

``outcome`` in [0, 1] is the satisfaction of this use: 1 for a use nobody complained about, the graded
agreement of a shadow check or the user's feedback score when one arrives. A new entry starts at
``INITIAL_VALUE`` (0: it has earned nothing yet), so entries that are never reused sink below the mean
and are dropped once they are older than the grace period, and entries that shadow checks or feedback
grade badly lose value faster than they gain it.
"""

from __future__ import annotations

import numpy as np

INITIAL_VALUE = 0.0
LEARNING_RATE = 0.3  # eta: weight of the newest outcome


def update_cache_value(value: float, use_count: int, outcome: float, *, rate: float = LEARNING_RATE) -> tuple[float, int]:
    """One use of an entry: returns (new cache value, new use count)."""
    outcome = min(1.0, max(0.0, float(outcome)))
    return (1.0 - rate) * float(value) + rate * outcome, int(use_count) + 1


def below_mean_mask(values: np.ndarray, ages_s: np.ndarray, *, grace_s: float,
                    groups: np.ndarray | None = None) -> np.ndarray:
    """Entries to drop under the xi rule: older than ``grace_s`` and valued below the mean.

    With ``groups`` (one label per entry: the stores pass the scope), the mean is taken within each
    group, so one scope's values never move another scope's bar: a tenant that raises its own entries'
    values cannot push another tenant's entries below the mean. Without it, the mean of all entries
    (the simulator: one agent's cache). Entries within the grace period are never dropped but do count
    toward the mean.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return np.zeros(0, dtype=bool)
    if groups is None:
        means = np.full(values.shape, float(values.mean()))
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        inverse = inverse.reshape(-1)
        means = (np.bincount(inverse, weights=values) / np.bincount(inverse))[inverse]
    return (np.asarray(ages_s) > grace_s) & (values < means - 1e-12)


def over_cap(values: np.ndarray, created: np.ndarray, *, cap: int, groups: np.ndarray) -> np.ndarray:
    """Indices of the entries to drop so that each group (the stores pass the scope) keeps at most
    ``cap``: within a group, the lowest cache value first, then the oldest. A group's size never
    costs another group an entry, so one tenant filling its scope cannot push out another's."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    group = group.reshape(-1)
    order = np.lexsort((np.asarray(created, dtype=np.float64), values, group))  # by group, value, age
    ranked = group[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    rank = np.arange(ranked.size) - np.repeat(starts, np.diff(np.r_[starts, ranked.size]))
    excess = np.bincount(group) - max(0, int(cap))
    return order[rank < excess[ranked]]
