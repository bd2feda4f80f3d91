"""The CPU pool that every HTTP worker of `allcores serve` shares (``--pool N``).

::

    primary (owner.py)                 HTTP worker (client.py)           pool process K
    ──────────────────                 ───────────────────────           (process.py)
    listen on one abstract UNIX        await offload(fn, *args)
      socket; N processes, niced,        connect ─ TASK ─────────────►  accept (only when
      forked or started; replaced                                       idle), run fn
      when one dies                    ◄──────────── RESULT | ERROR ──  close, accept next
                                       cancel: close ─► the process dies of SIGIO
                                       timeout: its own alarm ─► SIGALRM

No task passes through the primary. An idle process takes the next connection, so
the least busy process always gets the work; the kernel's accept queue (its length:
``--pool-queue``) is the pool's bounded queue. One task per process at a time, so a
crash, a timeout or a cancel fails that task alone. Each process writes its row of
the pool's scoreboard (busy or idle, tasks run, run and wait times), which
``allcores status`` and ``/metrics`` read.

Import the parts from their modules: an HTTP worker needs only the client, and a
pool process started as ``python -m allcores.server.shared_pool.process`` must not
find its own module imported already.
"""
