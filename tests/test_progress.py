"""The training ETA counts the evaluations (and their checkpoints) still to come."""
import pytest

from zotune.progress import Progress, eta_seconds, evals_left, format_duration


def test_evaluations_left():
    assert evals_left(0, 1000, 100) == 10
    assert evals_left(99, 1000, 100) == 10 and evals_left(100, 1000, 100) == 9
    assert evals_left(950, 1000, 300) == 1  # step 1000 itself, not a multiple of 300
    assert evals_left(0, 1000, 300) == 4  # 300, 600, 900 and 1000
    assert evals_left(1000, 1000, 100) == 0 and evals_left(0, 5, 100) == 1


def test_eta_counts_evaluations_and_checkpoints():
    # 1000 steps of 2 s, 10 dev evaluations of 872 examples and the test set of 1000 at 0.05 s an
    # example, a 3 s checkpoint after each dev evaluation
    eta = eta_seconds(step=0, steps=1000, eval_every=100, step_s=2.0, eval_s_per_example=0.05,
                      dev_examples=872, test_examples=1000, checkpoint_s=3.0)
    assert eta == pytest.approx(1000 * 2.0 + (10 * 872 + 1000) * 0.05 + 10 * 3.0)
    # at step 900 with the evaluation of step 900 still due: 2 evaluations left
    eta = eta_seconds(step=900, steps=1000, eval_every=100, step_s=2.0, eval_s_per_example=0.05,
                      dev_examples=872, test_examples=1000, eval_due=True)
    assert eta == pytest.approx(100 * 2.0 + (2 * 872 + 1000) * 0.05)
    assert eta_seconds(step=3, steps=10, eval_every=5, step_s=None, eval_s_per_example=0.1,
                       dev_examples=1, test_examples=1) is None  # no step timed yet


def test_eta_text_and_durations():
    report = Progress(enabled=False)
    report.step_time.add(4.0, 2)          # 2 s a step
    assert report.eta_text(step=8, steps=10, eval_every=5, dev_examples=10,
                           test_examples=10) == "eta 4s + evals"  # evaluations not timed yet
    report.eval_time.add(2.0, 20)         # 0.1 s an example
    assert report.eta_text(step=8, steps=10, eval_every=5, dev_examples=10,
                           test_examples=10) == "eta 6s incl. 1 eval + test"
    assert format_duration(45) == "45s" and format_duration(185) == "3m05s"
    assert format_duration(3725) == "1h02m"
