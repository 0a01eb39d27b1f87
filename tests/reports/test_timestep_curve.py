"""Dashboards name a feature's timing with the package's definitions (analysis/temporal.py), not their own."""

from __future__ import annotations

import numpy as np

from sae_lens_multimodal.reports.dashboard_data import TimestepCurve


def _curve(mean: list[float]) -> TimestepCurve:
    m = np.asarray(mean, dtype=np.float64)
    return TimestepCurve(timesteps=[900.0, 700.0, 500.0, 300.0, 100.0], mean=m, low=m - 0.1, high=m + 0.1)


def test_commit_and_half_max_of_a_rising_curve() -> None:
    # Rises to 1.0 at t=500 and stays there: within 10% of the final value from t=500; half its max at t=700.
    curve = _curve([0.0, 0.6, 1.0, 1.0, 1.0])
    assert curve.commit_timestep == 500.0
    assert curve.half_max_timestep == 700.0


def test_commit_waits_for_a_late_return() -> None:
    # Overshoots and comes back at the last step: it commits only there, although half its max comes early.
    curve = _curve([0.0, 1.0, 2.0, 2.0, 1.0])
    assert curve.commit_timestep == 100.0
    assert curve.half_max_timestep == 700.0  # 1.0 >= 2.0 / 2 at t=700


def test_a_silent_feature_has_no_half_max_and_commits_at_once() -> None:
    curve = _curve([0.0] * 5)
    assert curve.half_max_timestep is None
    assert curve.commit_timestep == 900.0


def test_a_bucketed_feature_is_timed_within_the_bucket_where_it_peaks() -> None:
    # Bucket 1 (t=700, 500) holds the feature; bucket 0's latent with the same index is another feature.
    m = np.asarray([0.9, 0.2, 1.0, 0.0, 0.0])
    curve = TimestepCurve(timesteps=[900.0, 700.0, 500.0, 300.0, 100.0], mean=m, low=m, high=m,
                          buckets=[0, 1, 1, 2, 2])
    assert curve.half_max_timestep == 500.0  # 0.2 < 1.0 / 2 at t=700; t=900 (0.9) belongs to another feature
    assert curve.commit_timestep == 500.0  # within its bucket it reaches its final value at t=500
    whole = TimestepCurve(timesteps=curve.timesteps, mean=m, low=m, high=m)
    assert whole.half_max_timestep == 900.0 and whole.commit_timestep == 300.0
