"""The driver stops a finished run's processes without waiting on ones that have already exited.

Flower's SuperExec leaves a finished ``flwr-simulation`` unreaped (a zombie) after `flwr run`
returns; a zombie stays "running" to a plain wait, so the driver used to wait its whole SIGTERM
timeout and then its SIGKILL wait after every run.
"""
from __future__ import annotations

import subprocess
import sys
import time

import psutil

from simulations.driver.processes import stop_processes

# a parent that starts a child which exits at once, never reaps it, and prints its pid
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "pass"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_zombie_is_not_waited_on_and_a_running_process_is_stopped():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        zombie = psutil.Process(int(parent.stdout.readline()))
        deadline = time.monotonic() + 20
        while zombie.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        start = time.monotonic()
        signalled = stop_processes([zombie, psutil.Process(sleeper.pid)], timeout=15.0)
        elapsed = time.monotonic() - start
        assert elapsed < 5.0, f"waited {elapsed:.1f} s"
        assert [p.pid for p in signalled] == [sleeper.pid]  # the zombie gets no signal
        assert sleeper.wait(5) is not None
    finally:
        for proc in (parent, sleeper):
            proc.kill()
            proc.wait()


def test_the_memory_watch_reads_pss_only_now_and_then_and_at_a_new_private_peak():
    """Reading PSS (smaps_rollup) of a run's tree took 160 ms a sample, 11 % of a core at one a
    second; private memory is cheap and read every time."""
    import numpy as np

    from simulations.driver.processes import ProcessWatch

    watch = ProcessWatch(pss_every=10)
    for _ in range(20):
        watch.sample()
    flat = watch.pss_samples
    assert watch.samples == 20 and 2 <= flat < 10 and watch.peak_pss > 0  # the 1st, the 11th, early peaks
    grown = np.ones(64 * 2 ** 20 // 8)  # 64 MiB of private memory touched: a new peak
    watch.sample()
    assert watch.pss_samples == flat + 1 and watch.peak_private >= 64
    del grown
