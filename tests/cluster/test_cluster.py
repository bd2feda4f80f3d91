"""The cluster end to end: real primary, real workers, real sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.cluster.conftest import http_get
from tests.conftest import free_port, wait_until


def test_fresh_connections_reach_more_than_one_worker(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2)
    pids = {int(http_get(run.port)) for _ in range(10)}
    assert len(pids) == 2
    assert pids == run.worker_pids()


def test_busy_worker_does_not_stop_the_others(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2)
    done = threading.Event()
    answer: list[str] = []

    def slow() -> None:
        answer.append(http_get(run.port, "/cpu?n=50000000", timeout=60))
        done.set()

    pids = run.worker_pids()
    start_cpu = {pid: _cpu_seconds(pid) for pid in pids}
    thread = threading.Thread(target=slow)
    thread.start()
    # Wait until one worker has burnt 0.5 s of CPU on /cpu: by then its loop has missed
    # enough heartbeats (heartbeat_stale is 0.25 s) for the primary to pass it over.
    busy_pid = wait_until(
        lambda: next((p for p in pids if _cpu_seconds(p) - start_cpu[p] > 0.5), None), timeout=15
    )
    fast = [int(http_get(run.port)) for _ in range(5)]
    finished_before = done.is_set()
    thread.join(60)
    assert answer and answer[0].split()[0] == str(busy_pid)
    assert all(pid != busy_pid for pid in fast), (fast, busy_pid)
    assert not finished_before, "the /cpu request ended too soon to show anything; raise n"


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def test_events_fire_with_node_arguments(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2)
    forks = run.wait_for("fork", count=2)
    assert sorted(e["id"] for e in forks) == [1, 2]
    run.wait_for("online", count=2)
    listening = run.wait_for("listening", count=2)
    assert {e["port"] for e in listening} == {run.port}
    assert {e["address"] for e in listening} == {"127.0.0.1"}
    victim = listening[0]
    os.kill(victim["pid"], signal.SIGKILL)
    exits = run.wait_for("exit", id=victim["id"])
    assert exits[0]["code"] is None and exits[0]["signal"] == "SIGKILL"
    assert exits[0]["planned"] is False
    run.wait_for("disconnect", id=victim["id"])
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0
    planned = run.find("exit", planned=True)
    assert len(planned) == 1 and planned[0]["code"] == 0


def test_messages_round_trip_with_a_socket(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2, APP_PING="1")
    messages = run.wait_for("message", count=2)
    assert all(m["handle"] for m in messages)
    assert sorted(m["message"]["ping"] for m in messages) == [1, 2]
    pongs = run.wait_for("pong", count=2)
    for pong in pongs:
        assert pong["message"] == {"pong": pong["id"]}
        assert pong["data"] == "through the handle"


@pytest.mark.parametrize("policy", ["balanced", "rr", "shared", "reuseport"])
def test_each_policy_serves(start_cluster, policy: str) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2, APP_POLICY=policy)
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda _: http_get(run.port), range(40)))
    pids = run.worker_pids()
    assert all(int(body) in pids for body in bodies)
    if policy in ("balanced", "rr"):
        # The primary decides, so both workers must have served.
        assert {int(body) for body in bodies} == pids
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0


@pytest.mark.parametrize("policy", ["balanced", "reuseport"])
def test_sigkilled_worker_is_respawned_and_port_keeps_answering(start_cluster, policy) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2, APP_RESPAWN="1", APP_POLICY=policy)
    first = run.worker_pids()
    victim = first.pop()
    os.kill(victim, signal.SIGKILL)
    for _ in range(5):
        # The survivor, or already its replacement: never the dead one.
        assert int(http_get(run.port)) != victim
    exit_event = run.wait_for("exit", pid=victim)[0]
    assert exit_event["signal"] == "SIGKILL"
    run.wait_for("listening", count=3)
    pids = run.worker_pids()
    assert victim not in pids and len(pids) == 2
    assert {int(http_get(run.port)) for _ in range(10)} <= pids


def test_crash_loop_stops_the_primary_with_a_report(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(
        workers=2, wait_listening=False, APP_RESPAWN="1", APP_BOOT_FAIL="1", APP_CRASH_LIMIT="4"
    )
    assert run.wait_exit(30) == 1
    stderr = "".join(run.stderr)
    assert "failed while booting: exit code 3" in stderr
    assert "crash_loop_limit=4" in stderr
    # Four workers failed the same way: their output is shown once, and the report
    # points at it instead of quoting it again.
    assert stderr.count("cannot boot: missing configuration APP_SECRET") == 1
    assert stderr.index("cannot boot") < stderr.index("Last output of worker")
    assert stderr.endswith("(shown above)\n")
    # Exactly the limit of unplanned exits; a worker still booting when the primary
    # stopped may exit too, but as part of the stop.
    assert len(run.find("exit", planned=False)) == 4
    assert run.find("primary-exit", code=1)


def test_sigterm_drains_in_flight_requests(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(http_get(run.port, "/sleep?s=1.5")))
    thread.start()
    wait_until(
        lambda: any(
            c.status == psutil.CONN_ESTABLISHED
            for pid in run.worker_pids()
            for c in psutil.Process(pid).net_connections()
        )
    )
    run.proc.send_signal(signal.SIGTERM)
    thread.join(20)
    assert result and result[0].endswith("slept")
    assert run.wait_exit() == 0
    assert all(e["planned"] and e["code"] == 0 for e in run.find("exit"))
    assert len(run.find("worker-done")) == 2


def test_sigkill_of_primary_leaves_no_worker(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2)
    workers = run.worker_pids()
    os.kill(run.proc.pid, signal.SIGKILL)
    run.wait_exit()

    def all_gone() -> bool:
        return not any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in workers
        )

    wait_until(all_gone, timeout=10)


def test_corrupt_frame_is_survived(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2, APP_RESPAWN="1")
    pids = run.worker_pids()
    # The request's worker corrupts its own channel; the primary drops that channel.
    culprit = None
    with contextlib.suppress(Exception):
        culprit = int(http_get(run.port, "/corrupt", timeout=5))
    wait_until(lambda: "bad magic" in "".join(run.stderr))
    assert run.proc.poll() is None
    for _ in range(6):
        assert int(http_get(run.port)) in run.worker_pids() | pids
    if culprit is not None:
        assert culprit in pids


def test_sigint_stops_cleanly(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=1)
    run.proc.send_signal(signal.SIGINT)
    assert run.wait_exit() == 0
    assert run.find("primary-exit", code=0)


def test_listen_hands_the_shared_socket_to_another_server(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2, APP_POLICY="shared", APP_MODE="listen")
    pids = run.worker_pids()
    assert all(int(http_get(run.port)) in pids for _ in range(10))


def test_listen_under_balanced_says_what_to_do(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=1, wait_listening=False, APP_MODE="listen")
    refused = run.wait_for("listen-refused")
    assert "use cluster.start_server" in refused[0]["error"]
    assert "'shared'" in refused[0]["error"]


def test_worker_disconnect_is_a_planned_exit(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2, APP_RESPAWN="1")
    # The worker asks; the primary calls worker.disconnect(): drain, exit 0, no respawn.
    pid = int(http_get(run.port, "/disconnect-me"))
    exit_event = run.wait_for("exit", pid=pid)[0]
    assert exit_event["planned"] is True and exit_event["code"] == 0
    run.wait_for("disconnect", pid=pid)
    assert len(run.find("fork")) == 2
    assert {int(http_get(run.port)) for _ in range(4)} == run.worker_pids()


def test_disconnect_calls_back_once_every_worker_is_gone(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2, APP_DISCONNECT_ALL="1")
    assert run.wait_exit() == 0
    run.wait_for("primary-exit", code=0)  # the primary's last line: every other is read
    kinds = [e["event"] for e in run.events if e["event"] in ("exit", "all-gone")]
    assert kinds == ["exit", "exit", "all-gone"]
    assert all(e["planned"] for e in run.find("exit"))


def test_a_crash_after_boot_is_told_apart_from_a_boot_failure(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=1, APP_RESPAWN="1")
    with contextlib.suppress(Exception):
        http_get(run.port, "/exit?code=7", timeout=5)
    run.wait_for("listening", count=2)
    stderr = "".join(run.stderr)
    assert "crashed: exit code 7" in stderr
    assert "failed while booting" not in stderr


def test_setup_primary_exec_args_and_silent(processes) -> None:  # type: ignore[no-untyped-def]
    """A primary that runs another program as its workers, with its output hidden."""
    port = free_port()
    primary = (
        "import sys\n"
        "from allcores import cluster\n"
        "cluster.setup_primary(exec=sys.argv[1], args=[], silent=True)\n"
        "cluster.fork()\n"
        "def listening(worker, address):\n"
        "    print('listening', worker.id, address.port, flush=True)\n"
        "    cluster.stop()\n"
        "cluster.on('listening', listening)\n"
        "sys.exit(cluster.run())\n"
    )
    app = str(Path(__file__).with_name("cluster_app.py"))
    env = dict(os.environ, APP_PORT=str(port))
    proc = processes.python("-c", primary, app, env=env, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    # The worker's own stdout ("worker 1 up") is hidden by silent=True.
    assert out.decode().splitlines() == [f"listening 1 {port}"]


def _accept_queue(port: int) -> int | None:
    """Connections waiting in the kernel's accept queue of 127.0.0.1:*port*."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                return int(queues.split(":")[1], 16)
    return None


def test_connections_a_dead_worker_never_took_go_to_its_successor(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=1, APP_RESPAWN="1")
    (victim,) = run.worker_pids()
    before = _cpu_seconds(victim)

    def doomed_request() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            http_get(run.port, "/cpu?n=500000000", 60)  # its worker will be killed

    doomed = threading.Thread(target=doomed_request)
    doomed.start()
    wait_until(lambda: _cpu_seconds(victim) - before > 0.3)
    # The only worker's loop is stuck: the primary accepts these and queues them on its
    # channel, where the worker does not read them.
    answers: list[str] = []
    clients = [
        threading.Thread(target=lambda: answers.append(http_get(run.port, timeout=30)))
        for _ in range(3)
    ]
    for client in clients:
        client.start()
    wait_until(lambda: _accept_queue(run.port) == 0 and len(_established(run.port)) >= 4)
    os.kill(victim, signal.SIGKILL)
    for client in clients:
        client.join(40)
    doomed.join(40)
    # The primary hands the held connections over before it reports the successor
    # listening, so its answers can be here before that event line is read.
    run.wait_for("listening", count=2)
    (successor,) = run.worker_pids()
    assert successor != victim
    assert answers == [str(successor)] * 3


def _established(port: int) -> list[str]:
    with open("/proc/net/tcp") as table:
        return [
            line
            for line in table.readlines()[1:]
            if line.split()[3] == "01" and int(line.split()[2].split(":")[1], 16) == port
        ]


def test_primary_exits_1_when_its_last_worker_dies_unplanned(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=1)
    with contextlib.suppress(OSError, http.client.HTTPException):
        http_get(run.port, "/exit?code=7", timeout=5)
    assert run.wait_exit() == 1
    assert run.find("exit", code=7, planned=False)


def test_stop_while_a_worker_boots_ends_cleanly(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=1, wait_listening=False, APP_BOOT_DELAY="1")
    run.wait_for("online")
    # The disconnect reaches the worker before it serves: its start_server() returns a
    # finished server, so it exits 0 at once instead of waiting out the grace period.
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit(timeout=15) == 0
    (exit_event,) = run.find("exit")
    assert exit_event["code"] == 0 and exit_event["planned"] is True
    assert run.find("worker-done")


def test_connections_queued_for_a_closed_server_go_to_another_worker(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=2, APP_POLICY="rr")
    closing: list[str] = []
    blocker = threading.Thread(
        target=lambda: closing.append(http_get(run.port, "/busy-then-close?s=1.5"))
    )
    blocker.start()
    busy = wait_until(lambda: _stuck_worker(run.worker_pids()))
    # Round-robin sends about half of these to the blocked worker, which closes its
    # server before reading them: it must hand them back, not drop or strand them.
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: int(http_get(run.port, timeout=30)), range(6)))
    blocker.join(30)
    assert closing == [str(busy)]
    assert set(answers) == run.worker_pids() - {busy}


def _stuck_worker(pids: set[int]) -> int | None:
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() == psutil.STATUS_SLEEPING and _in_sleep(pid):
                return pid
    return None


def _in_sleep(pid: int) -> bool:
    # time.sleep() in the handler: the main thread waits in hrtimer_nanosleep / clock_nanosleep.
    try:
        with open(f"/proc/{pid}/wchan") as wchan:
            return "nanosleep" in wchan.read()
    except OSError:
        return False


def test_a_message_the_worker_cannot_unpickle_is_dropped_not_fatal(start_cluster) -> None:  # type: ignore[no-untyped-def]
    run = start_cluster(workers=1, APP_SEND_UNPICKLABLE="1")
    run.wait_for("message", message="got after")
    assert not run.find("exit")
    assert int(http_get(run.port)) in run.worker_pids()
    assert "a message from the primary was dropped" in "".join(run.stderr)
