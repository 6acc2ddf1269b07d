"""The console's lag chart: an hour of per-minute samples as SVG points, newest at the right."""

from __future__ import annotations

from api.http.console.pages import LAG_CHART_HEIGHT, LAG_CHART_WIDTH, lag_chart
from projections.engine.catalog import LagSample

NOW = 60 * 1_000_000 + 30.0  # half a minute into minute 1,000,000


def test_no_samples_no_chart() -> None:
    assert lag_chart([], NOW) is None


def test_the_newest_minute_is_at_the_right_and_the_highest_lag_at_the_top() -> None:
    samples = [
        LagSample(minute=1_000_000 - 59, lag_events=0, lag_seconds=0.0),
        LagSample(minute=1_000_000 - 30, lag_events=40, lag_seconds=8.0),
        LagSample(minute=1_000_000, lag_events=10, lag_seconds=2.0),
    ]

    chart = lag_chart(samples, NOW)

    assert chart is not None
    points = [tuple(map(float, p.split(","))) for p in chart.points.split()]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    assert xs == sorted(xs) and 0 < xs[0] < 2 and LAG_CHART_WIDTH - 2 < xs[-1] < LAG_CHART_WIDTH
    assert ys[0] == LAG_CHART_HEIGHT - 1  # no lag: the bottom
    assert ys[1] == 1  # the most: the top
    assert chart.top == 8.0
    assert chart.last == points[-1]


def test_lags_under_a_second_are_drawn_against_one_second() -> None:
    chart = lag_chart([LagSample(minute=1_000_000, lag_events=1, lag_seconds=0.5)], NOW)

    assert chart is not None and chart.top == 1.0
    assert chart.last[1] == (LAG_CHART_HEIGHT - 1 + 1) / 2
