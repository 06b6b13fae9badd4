"""training/monitor: the progress line's time left."""

import pytest

from cpt.training.monitor import Pace, progress_text


def test_the_eta_follows_the_pace_of_the_current_phase():
    """10 head steps at 1 s, then full steps at 3 s, 100 steps in all: after the switch the time left is
    counted at 3 s a step, not at the run's blended average (which promised too early an end)."""
    pace = Pace(step=0, elapsed_s=0.0)
    assert pace.eta_s(5, 5.0, "head", 100) == pytest.approx(95.0)  # a lower bound: full steps cost more
    assert pace.eta_s(10, 10.0, "head", 100) == pytest.approx(90.0)
    assert pace.eta_s(20, 40.0, "full", 100) == pytest.approx(80 * 3.0)  # the run-wide 2 s/step said 160
    assert pace.eta_s(30, 70.0, "full", 100) == pytest.approx(70 * 3.0)


def test_a_resumed_session_counts_from_where_it_resumed():
    pace = Pace(step=50, elapsed_s=500.0)  # the first session ran 10 s/step (a slower machine)
    assert pace.eta_s(60, 520.0, "full", 100) == pytest.approx(40 * 2.0)


def test_the_head_phase_eta_is_marked_as_a_lower_bound():
    entry = {"step": 5, "phase": "head", "loss": 9.0, "mlm_acc": 0.0, "lr": 1e-3, "tokens_per_s": 100.0}
    assert "eta >1.5 min" in progress_text(entry, 100, 90.0)
    assert "eta 1.5 min" in progress_text({**entry, "phase": "full"}, 100, 90.0)
