"""The factory's decisions (coffea_hq.factory.policy): pure functions, every branch."""

from __future__ import annotations

import pytest

from coffea_hq.factory.policy import BatchState, Bounds, Cooldown, WorkerJob, decide, wanted

IDLE, RUNNING, HELD = BatchState.IDLE, BatchState.RUNNING, BatchState.HELD


def jobs(*states: BatchState, busy: bool | None = None) -> list[WorkerJob]:
    return [WorkerJob(f"7.{i}", s, busy if s is RUNNING else None) for i, s in enumerate(states)]


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("work", "slots", "expected"),
    [
        (0, 1, 2),
        (1, 1, 2),
        (3, 1, 3),
        (7, 2, 4),
        (8, 2, 4),
        (9, 2, 5),
        (1000, 4, 10),
    ],
)
def test_wanted_is_one_slot_per_task_within_bounds(work: int, slots: int, expected: int) -> None:
    assert wanted(work, Bounds(2, 10, slots)) == expected


@pytest.mark.timeout(5)
def test_empty_queue_fills_up_to_min_and_then_rests() -> None:
    bounds = Bounds(2, 8, 1)
    first = decide(0, [], bounds)
    assert (first.target, first.submit, first.remove) == (2, 2, ())
    assert "needs 0 worker(s), min 2" in first.reason
    rest = decide(0, jobs(IDLE, RUNNING), bounds)
    assert rest.idle and "nothing to do" in rest.reason


@pytest.mark.timeout(5)
def test_backlog_submits_the_difference_capped_at_max() -> None:
    d = decide(50, jobs(RUNNING, RUNNING, IDLE), Bounds(0, 10, 4))
    assert (d.target, d.submit) == (10, 7)
    assert d.reason == (
        "work 50 at 4 slot(s) per worker needs 13 worker(s), max 10; "
        "have 2 running + 1 idle: submit 7"
    )


@pytest.mark.timeout(5)
def test_scale_down_removes_held_then_idle_then_free_then_busy_workers() -> None:
    pool = [
        WorkerJob("1.0", RUNNING, busy=True),
        WorkerJob("1.1", RUNNING, busy=False),
        WorkerJob("1.2", IDLE),
        WorkerJob("1.3", HELD),
        WorkerJob("1.4", RUNNING, None),
        WorkerJob("1.5", IDLE),
    ]
    bounds = Bounds(0, 10, 1)
    order = [decide(work, pool, bounds).remove for work in (5, 4, 3, 2, 1, 0)]
    assert order == [
        ("1.3",),
        ("1.3", "1.5"),
        ("1.3", "1.5", "1.2"),
        ("1.3", "1.5", "1.2", "1.1"),
        ("1.3", "1.5", "1.2", "1.1", "1.4"),
        ("1.3", "1.5", "1.2", "1.1", "1.4", "1.0"),
    ]
    last = decide(0, pool, bounds)
    assert "remove 6, 2 of them drain their tasks first" in last.reason


@pytest.mark.timeout(5)
def test_running_workers_are_removed_only_below_the_work() -> None:
    # 3 tasks still out there: the 3 busy workers stay, the free one and the idle job go.
    pool = jobs(RUNNING, RUNNING, RUNNING, busy=True) + [
        WorkerJob("8.0", RUNNING, False),
        WorkerJob("8.1", IDLE),
    ]
    d = decide(3, pool, Bounds(1, 10, 1))
    assert set(d.remove) == {"8.0", "8.1"}


@pytest.mark.timeout(5)
def test_cooldown_holds_surplus_jobs() -> None:
    d = decide(0, jobs(RUNNING, RUNNING), Bounds(0, 4, 1), scale_down=False)
    assert d.idle and "2 surplus, waiting for cooldown" in d.reason
    cooldown = Cooldown(60)
    assert not cooldown.allows_scale_down(target=0, have=2, now=100.0)
    assert not cooldown.allows_scale_down(target=0, have=2, now=159.0)
    assert cooldown.allows_scale_down(target=0, have=2, now=160.0)
    assert not cooldown.allows_scale_down(target=2, have=2, now=161.0)  # work came back
    assert not cooldown.allows_scale_down(target=0, have=2, now=170.0)  # the clock restarts
    assert Cooldown(0).allows_scale_down(target=1, have=2, now=0.0)


@pytest.mark.timeout(5)
def test_held_jobs_count_so_a_broken_submission_does_not_churn() -> None:
    d = decide(4, jobs(HELD, HELD, HELD, HELD), Bounds(0, 8, 1))
    assert d.idle
    assert "4 held: see condor_q -hold" in d.reason


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ((-1, 4, 1), "--min must be 0 or more"),
        ((5, 4, 1), "--max must be at least 1 and at least --min (5)"),
        ((0, 0, 1), "--max must be at least 1"),
        ((0, 4, 0), "--slots must be at least 1"),
    ],
)
def test_bad_bounds_are_refused_with_the_option_named(
    bounds: tuple[int, int, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Bounds(*bounds)
