"""How many intra-op threads torch gets in the command-line tools, decided before torch is imported.

torch's default, one thread per core, is the fastest choice on an idle machine but the slowest by far on a busy one:
its threads wait for each other at every operation while other processes hold the cores (measured on 2 cores: the
main job in 29 s with 2 threads against 39 s with 1 when idle, and in 997 s against 89 s at a load average of 4-5;
``python benchmarks/threads.py``). The rule of ``lightning-cnet`` and ``lightning-cnet-analyze``, in order:

1. ``LIGHTNING_CNET_THREADS=N`` (a positive integer): ``N`` threads;
2. ``OMP_NUM_THREADS`` is set: it is left to torch (which reads it);
3. otherwise the cores this process may use that the 1-minute load average leaves free, rounded, at least 1; when
   every core is free nothing is set and torch keeps its default (and Lightning's multi-process launchers divide
   the cores among their processes as usual).

The count is passed on as ``OMP_NUM_THREADS``, so that torch, NumPy and the processes started by the run (data
loader workers, ``ddp`` ranks) start with it. This module imports nothing heavy.

Example:
    >>> choose_threads({}, cores=2, load=0.1) is None  # idle: torch's default
    True
    >>> choose_threads({}, cores=2, load=5.3)  # busy: one thread
    1
    >>> choose_threads({"LIGHTNING_CNET_THREADS": "2"}, cores=2, load=5.3)
    2
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

#: Environment variable that sets the thread count of the command-line tools.
THREADS_VARIABLE = "LIGHTNING_CNET_THREADS"


class ThreadSettingError(ValueError):
    """``LIGHTNING_CNET_THREADS`` is not a positive integer."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return 0.0


def choose_threads(environ: Mapping[str, str], *, cores: int, load: float) -> int | None:
    """The intra-op thread count by the rule of this module, or ``None`` to leave torch's choice alone.

    Args:
        environ: the environment (``LIGHTNING_CNET_THREADS``, ``OMP_NUM_THREADS``).
        cores: cores this process may use.
        load: the 1-minute load average.

    Raises:
        ThreadSettingError: ``LIGHTNING_CNET_THREADS`` is set but not a positive integer.
    """
    given = environ.get(THREADS_VARIABLE, "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ThreadSettingError(f"{THREADS_VARIABLE}={given!r} is not valid: expected a positive integer "
                                     "(the torch threads to use)")
        return int(given)
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    free = int(cores - load + 0.5)
    return None if free >= cores else max(1, free)


def configure_threads(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Apply :func:`choose_threads` to this process before torch is imported: set ``OMP_NUM_THREADS``.

    Args:
        environ: the environment to read and change (default: ``os.environ``, and torch itself if it is already
            imported).

    Returns:
        A line saying what was chosen when the load average chose fewer threads than cores, else ``None``.

    Raises:
        ThreadSettingError: ``LIGHTNING_CNET_THREADS`` is set but not a positive integer.
    """
    own_process = environ is None
    environ = os.environ if environ is None else environ
    cores, load = usable_cores(), load_average()
    threads = choose_threads(environ, cores=cores, load=load)
    if threads is None:
        return None
    explicit = bool(environ.get(THREADS_VARIABLE, "").strip())
    environ["OMP_NUM_THREADS"] = str(threads)
    if own_process and "torch" in sys.modules:  # too late for the variable: tell torch itself
        sys.modules["torch"].set_num_threads(threads)
    if explicit:
        return None
    return (f"{threads} torch thread{'s' if threads > 1 else ''} (load average {load:.1f} on {cores} cores; set "
            f"{THREADS_VARIABLE} to choose)")
