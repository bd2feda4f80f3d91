"""A process that holds a SharedArray and obeys one command per stdin line (for test_array).

Each command prints exactly one line: its result, or "ok".

    create SHAPE DTYPE   make a new array here (this process owns it); prints its handle
    attach HEX           unpickle a handle printed by `create` (the /proc fallback path)
    recv FD              receive the array as a frame on the allcores channel at FD
    read                 the array's values as JSON
    write INDEX VALUE    set one element (flat index)
    add N THREADS        THREADS threads each add 1 to element 0, N times, under the lock
    hold                 take the lock and keep it
    try                  whether the lock can be taken now (released again at once)
    forktry              like try, from a child forked right now (the fork inherits the object)
    forkwait             fork a child that waits for the lock (blocking) and reports
    forkresult           whether that child got the lock (false if not within 20 s)
    release              release the lock taken by `hold`
"""

from __future__ import annotations

import json
import os
import pickle
import select
import signal
import socket
import sys
import threading

from allcores.ipc import Channel
from allcores.shm import SharedArray, received_fds


def add_under_lock(arr: SharedArray, times: int) -> None:
    view = arr.numpy()
    for _ in range(times):
        with arr.lock:
            value = int(view.flat[0])
            view.flat[0] = value + 1


def try_in_forked_child(arr: SharedArray) -> bool:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        taken = arr.lock.acquire(blocking=False)
        os.write(write_end, b"1" if taken else b"0")
        os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 1)
    os.close(read_end)
    os.waitpid(pid, 0)
    return answer == b"1"


class ForkedWaiter:
    def __init__(self, pid: int, read_end: int) -> None:
        self.pid = pid
        self.read_end = read_end

    def result(self) -> bool:
        ready, _, _ = select.select([self.read_end], [], [], 20)
        if not ready:
            os.kill(self.pid, signal.SIGKILL)
        answer = os.read(self.read_end, 1) if ready else b""
        os.close(self.read_end)
        os.waitpid(self.pid, 0)
        return answer == b"1"


def wait_in_forked_child(arr: SharedArray) -> ForkedWaiter:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        arr.lock.acquire()
        os.write(write_end, b"1")
        os._exit(0)
    os.close(write_end)
    return ForkedWaiter(pid, read_end)


def main() -> None:
    arr: SharedArray | None = None
    waiter: ForkedWaiter | None = None
    for line in sys.stdin:
        command, *args = line.split()
        reply = "ok"
        if command == "create":
            arr = SharedArray(int(args[0]), args[1])
            reply = pickle.dumps(arr).hex()
        elif command == "attach":
            arr = pickle.loads(bytes.fromhex(args[0]))
        elif command == "recv":
            channel = Channel(socket.socket(fileno=int(args[0])), raw=True)
            payload, fds = channel.recv_bytes()
            with received_fds(fds):
                arr = pickle.loads(payload)
            for fd in fds:
                socket.close(fd)
            reply = json.dumps({"owner": arr.owner})
        else:
            assert arr is not None, "create, attach or recv first"
            if command == "read":
                reply = json.dumps(arr.numpy().tolist())
            elif command == "write":
                arr.numpy().flat[int(args[0])] = int(args[1])
            elif command == "add":
                threads = [
                    threading.Thread(target=add_under_lock, args=(arr, int(args[0])))
                    for _ in range(int(args[1]))
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            elif command == "hold":
                arr.lock.acquire()
            elif command == "try":
                taken = arr.lock.acquire(blocking=False)
                if taken:
                    arr.lock.release()
                reply = json.dumps(taken)
            elif command == "forktry":
                reply = json.dumps(try_in_forked_child(arr))
            elif command == "forkwait":
                waiter = wait_in_forked_child(arr)
            elif command == "forkresult":
                assert waiter is not None, "forkwait first"
                reply = json.dumps(waiter.result())
            elif command == "release":
                arr.lock.release()
            else:
                reply = f"unknown command {command!r}"
        print(reply, flush=True)


if __name__ == "__main__":
    main()
