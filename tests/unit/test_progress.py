"""The stop sentence says how far the current stage got, in that stage's unit."""

from rba_core.progress import Tracker, stage_unit, stopped_sentence


def test_a_tracker_remembers_the_current_stage_and_forwards_reports():
    seen, stages = [], []
    tracker = Tracker(lambda done, total: seen.append((done, total)), on_stage=stages.append)
    tracker(32, 100)
    assert tracker.stopped() == "Stopped after 32 of 100 images; nothing partial was stored."
    tracker.stage("Measured search: 10 of 10 candidates fit the budget")
    assert tracker.stopped() == "Stopped before any candidate runs were counted; nothing partial was stored."
    tracker(3, 10)
    assert tracker.stopped() == "Stopped after 3 of 10 candidate runs; nothing partial was stored."
    assert seen == [(32, 100), (3, 10)] and stages == ["Measured search: 10 of 10 candidates fit the budget"]


def test_units_and_sentences():
    assert stage_unit("Evaluation samples (test split): original model") == "images"
    assert stage_unit("Measured search: original block outputs in chunks of 8 of 64 samples") == "candidate runs"
    assert stopped_sentence(0, 0) == "Stopped before any images were counted; nothing partial was stored."
