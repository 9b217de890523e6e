#!/usr/bin/env python3
"""Runs a command and reports, per stage of its output, how busy each of its threads was.

Usage:
    python3 scripts/thread_cpu.py [--interval S] -- target/release/gridwatch bench ...

Every --interval seconds (default 0.02) it reads each thread's user + system ticks from
/proc/PID/task/*/stat (Linux only). A line the command writes to stderr that starts with
"bench:" opens a new stage (`gridwatch bench` announces each one so). Intervals in which the
whole process used less than --busy cores (default 0.6) are left out, so that group joins and
other waits do not dilute the figures. Prints, per stage: its wall time, its busy time, and each
thread's CPU in cores over the busy time. tokio's workers are told apart by the last two digits
of their thread id. docs/performance.md has what it found.
"""

import argparse
import collections
import os
import subprocess
import sys
import time


def thread_ticks(pid):
    """{thread label: user + system ticks} of every thread of `pid` now."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name.startswith("tokio"):
            name = f"{name}#{tid[-2:]}"
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks[(tid, name)] = int(fields[11]) + int(fields[12])
    return ticks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--busy", type=float, default=0.6)
    parser.add_argument("command", nargs="+")
    args = parser.parse_args()
    hz = os.sysconf("SC_CLK_TCK")

    child = subprocess.Popen(args.command, stderr=subprocess.PIPE, text=True)
    os.set_blocking(child.stderr.fileno(), False)
    stages = []  # [name, wall seconds, busy seconds, Counter of ticks]
    stage = ["start", 0.0, 0.0, collections.Counter()]
    stages.append(stage)
    before, then = {}, time.monotonic()
    while child.poll() is None:
        for line in iter(child.stderr.readline, ""):
            if line.startswith("bench:"):
                stage = [line.strip(), 0.0, 0.0, collections.Counter()]
                stages.append(stage)
            else:
                sys.stderr.write(line)
        now = time.monotonic()
        try:
            ticks = thread_ticks(child.pid)
        except FileNotFoundError:
            break
        used = collections.Counter()
        for key, t in ticks.items():
            if key in before and t > before[key]:
                used[key[1]] += t - before[key]
        before = ticks
        elapsed = max(now - then, 1e-6)
        then = now
        stage[1] += elapsed
        if sum(used.values()) / hz / elapsed >= args.busy:
            stage[2] += elapsed
            stage[3].update(used)
        time.sleep(args.interval)
    for line in child.stderr:
        sys.stderr.write(line)

    for name, wall, busy, used in stages:
        if busy == 0:
            continue
        threads = ", ".join(f"{t} {n / hz / busy:.2f}" for t, n in used.most_common(6))
        print(f"{name} ({wall:.2f} s, {busy:.2f} s busy): {threads}")
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
