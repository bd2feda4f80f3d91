"""The supervision policy on its own: crash loops and respawn backoff, no processes."""

from __future__ import annotations

import math

from allcores.cluster.policy import Exit, RespawnPolicy, Verdict
from allcores.cluster.settings import ClusterSettings

# The jitter that leaves a delay as it is: 0.5 is the middle of [0, 1).
NO_JITTER = 0.5


def settings(**changes: object) -> ClusterSettings:
    base: dict[str, object] = {
        "respawn_delay": 0.1,
        "respawn_delay_max": 10.0,
        "crash_loop_limit": 5,
        "crash_loop_window": 30.0,
        "boot_period": 5.0,
    }
    base.update(changes)
    return ClusterSettings(**base)  # type: ignore[arg-type]


def crash(
    ended: float,
    *,
    row: int = 0,
    lived: float = 1.0,
    listened: bool = False,
    planned: bool = False,
    code: int | None = 1,
    signal: str | None = None,
) -> Exit:
    return Exit(
        worker_id=7,
        pid=1234,
        code=code,
        signal=signal,
        row=row,
        started=ended - lived,
        ended=ended,
        listened=listened,
        planned=planned,
    )


def test_the_crash_that_reaches_the_limit_is_a_crash_loop() -> None:
    policy = RespawnPolicy(settings(crash_loop_limit=3))
    assert policy.judge(crash(100.0)) is Verdict.CRASH
    assert policy.judge(crash(101.0)) is Verdict.CRASH
    assert policy.judge(crash(102.0)) is Verdict.CRASH_LOOP


def test_crashes_older_than_the_window_are_forgotten() -> None:
    policy = RespawnPolicy(settings(crash_loop_limit=3, crash_loop_window=30.0))
    assert policy.judge(crash(100.0)) is Verdict.CRASH
    assert policy.judge(crash(110.0)) is Verdict.CRASH
    # 100.0 is more than 30 s before 131.0: only two crashes are in the window.
    assert policy.judge(crash(131.0)) is Verdict.CRASH
    assert policy.judge(crash(135.0)) is Verdict.CRASH_LOOP


def test_a_crash_exactly_one_window_ago_still_counts() -> None:
    policy = RespawnPolicy(settings(crash_loop_limit=2, crash_loop_window=30.0))
    policy.judge(crash(100.0))
    assert policy.judge(crash(130.0)) is Verdict.CRASH_LOOP


def test_planned_exits_are_not_counted() -> None:
    policy = RespawnPolicy(settings(crash_loop_limit=2))
    assert policy.judge(crash(100.0)) is Verdict.CRASH
    for second in range(10):
        assert policy.judge(crash(101.0 + second, planned=True, code=0)) is Verdict.PLANNED
    assert policy.judge(crash(120.0)) is Verdict.CRASH_LOOP


def test_a_limit_of_one_stops_at_the_first_crash() -> None:
    policy = RespawnPolicy(settings(crash_loop_limit=1))
    assert policy.judge(crash(100.0)) is Verdict.CRASH_LOOP


def test_backoff_doubles_per_crash_of_the_same_row() -> None:
    policy = RespawnPolicy(settings(respawn_delay=0.1, respawn_delay_max=10.0))
    delays = [policy.respawn_delay(crash(100.0 + i), NO_JITTER) for i in range(4)]
    assert all(
        math.isclose(got, want) for got, want in zip(delays, [0.1, 0.2, 0.4, 0.8], strict=True)
    )


def test_backoff_stops_at_the_cap_and_stays_there() -> None:
    policy = RespawnPolicy(settings(respawn_delay=1.0, respawn_delay_max=5.0))
    delays = [policy.respawn_delay(crash(100.0 + i), NO_JITTER) for i in range(2000)]
    assert delays[:4] == [1.0, 2.0, 4.0, 5.0]
    # Thousands of crashes later (a slow crash loop below the limit) it is still the cap.
    assert set(delays[3:]) == {5.0}


def test_rows_back_off_independently() -> None:
    policy = RespawnPolicy(settings(respawn_delay=0.1))
    policy.respawn_delay(crash(100.0, row=0), NO_JITTER)
    policy.respawn_delay(crash(101.0, row=0), NO_JITTER)
    assert math.isclose(policy.respawn_delay(crash(102.0, row=1), NO_JITTER), 0.1)
    assert math.isclose(policy.respawn_delay(crash(103.0, row=0), NO_JITTER), 0.4)


def test_a_worker_that_stayed_up_past_the_boot_period_starts_the_backoff_over() -> None:
    policy = RespawnPolicy(settings(respawn_delay=0.1, boot_period=5.0))
    for i in range(3):
        policy.respawn_delay(crash(100.0 + i), NO_JITTER)
    assert math.isclose(policy.respawn_delay(crash(200.0, lived=6.0), NO_JITTER), 0.1)
    assert math.isclose(policy.respawn_delay(crash(201.0), NO_JITTER), 0.2)


def test_a_worker_that_listened_but_died_soon_after_keeps_backing_off() -> None:
    # A worker that dies a second after it starts serving, forever: the delay must
    # grow, not restart at 0.1 s each time it got to listening.
    policy = RespawnPolicy(settings(respawn_delay=0.1, boot_period=5.0))
    delays = [
        policy.respawn_delay(crash(100.0 + 10 * i, row=2, listened=True), NO_JITTER)
        for i in range(4)
    ]
    assert [round(d, 3) for d in delays] == [0.1, 0.2, 0.4, 0.8]


def test_jitter_spreads_the_delay_by_half_either_way() -> None:
    low = RespawnPolicy(settings(respawn_delay=1.0)).respawn_delay(crash(100.0), 0.0)
    high = RespawnPolicy(settings(respawn_delay=1.0)).respawn_delay(crash(100.0), 0.999)
    assert math.isclose(low, 0.5)
    assert 1.49 < high < 1.5


def test_settings_changed_later_apply_to_the_next_exit() -> None:
    shared = settings(crash_loop_limit=5)
    policy = RespawnPolicy(shared)
    assert policy.judge(crash(100.0)) is Verdict.CRASH
    shared.update(crash_loop_limit=2)
    assert policy.judge(crash(101.0)) is Verdict.CRASH_LOOP


def test_an_exit_before_listening_within_the_boot_period_is_a_boot_failure() -> None:
    policy = RespawnPolicy(settings(boot_period=5.0))
    assert policy.booting(crash(100.0, lived=1.0))
    assert not policy.booting(crash(100.0, lived=6.0))
    assert not policy.booting(crash(100.0, lived=1.0, listened=True))


def test_descriptions_say_how_and_when_a_worker_died() -> None:
    policy = RespawnPolicy(settings(boot_period=5.0))
    booting = policy.describe(crash(100.0, lived=1.0, code=3))
    assert booting == "worker 7 (pid 1234) failed while booting: exit code 3"
    killed = policy.describe(crash(100.0, listened=True, code=None, signal="SIGKILL"))
    assert killed == "worker 7 (pid 1234) crashed: killed by SIGKILL"


def test_the_crash_loop_report_names_the_limit_and_shows_the_output() -> None:
    policy = RespawnPolicy(settings(crash_loop_limit=2, crash_loop_window=30.0))
    policy.judge(crash(100.0))
    last = crash(101.0, code=3)
    assert policy.judge(last) is Verdict.CRASH_LOOP
    report = policy.crash_loop_report(last, ["Traceback (most recent call last):", "boom"])
    assert report.startswith("allcores: worker 7 (pid 1234) failed while booting: exit code 3; ")
    assert "2 unplanned worker exits within 30 s (crash_loop_limit=2)" in report
    assert report.endswith(
        "Last output of worker 7:\n  | Traceback (most recent call last):\n  | boom"
    )
    assert policy.crash_loop_report(last, []).endswith("  (no output)")
    assert policy.crash_loop_report(last, ["boom"], shown_above=True).endswith("(shown above)")
