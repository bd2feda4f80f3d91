"""Starting child processes: the building block under `Pool` and `allcores.Worker`.

- `fds`: the parent's ends of child channels, closed in every other forked child.
- `zygote`: a small process forked before any thread starts, which forks the pool's
  workers on request, so that a replacement never comes from a process with threads.
"""
