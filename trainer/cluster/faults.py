"""Fault injection, for testing the failure handling only: ``IMAGENET_TRAINER_FAULT``.

A real cluster's faults (a rank that crashes or hangs, a NaN loss, a bad node) cannot be ordered
on demand, so the tests ask for them through one environment variable, read by the code that
handles each fault where it would happen::

    IMAGENET_TRAINER_FAULT=KIND@RANK:STEP[:RESTART][,KIND@RANK:STEP[:RESTART]...]

- KIND: ``crash`` (the rank exits at once, as a segfault would), ``hang`` (the rank stops making
  progress), ``nan`` (the rank's loss is NaN), ``health`` (the rank's health check fails);
- RANK: a global rank, or ``*`` for every rank;
- STEP: a global step, or ``A-B`` for every step from A to B inclusive (``health``: use 0); for
  ``nan``, the count of batches fed (optimiser steps), which a guard rollback does not move back,
  so the batches it skips are not poisoned again (trainer/cluster/guard.py);
- RESTART: only on this ``SLURM_RESTART_COUNT`` (0 for the first run of a job); every run when
  left out.

Unset, nothing is injected; a value that does not parse is an error naming the part at fault.
Never set it in a real run.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

from data_pipelines import launch

ENV = "IMAGENET_TRAINER_FAULT"
KINDS = ("crash", "hang", "nan", "health")
_ONE = re.compile(r"(?P<kind>[a-z]+)@(?P<rank>\*|\d+):(?P<first>\d+)(?:-(?P<last>\d+))?(?::(?P<restart>\d+))?")


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    rank: int | None  # None: every rank
    first_step: int
    last_step: int
    restart: int | None  # None: every restart

    def applies(self, kind: str, rank: int, step: int, restart: int) -> bool:
        return (kind == self.kind and self.rank in (None, rank) and self.first_step <= step <= self.last_step
                and self.restart in (None, restart))


def parse(text: str) -> list[Fault]:
    """The faults of an ``IMAGENET_TRAINER_FAULT`` value ("" gives none)."""
    faults = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _ONE.fullmatch(part)
        if not m or m["kind"] not in KINDS:
            raise ValueError(f"{ENV}: {part!r} is not KIND@RANK:STEP[:RESTART] with KIND one of {', '.join(KINDS)}, "
                             f"RANK a number or *, STEP a number or A-B (e.g. crash@1:5:0)")
        first = int(m["first"])
        last = int(m["last"]) if m["last"] else first
        if last < first:
            raise ValueError(f"{ENV}: {part!r}: the step range {first}-{last} is empty")
        faults.append(Fault(m["kind"], None if m["rank"] == "*" else int(m["rank"]), first, last,
                            None if m["restart"] is None else int(m["restart"])))
    return faults


def restart_count(env: Mapping[str, str] = os.environ) -> int:
    """Which run of the job this is (the launch layer's: SLURM's restart count, 0 outside SLURM)."""
    return launch.restart_count(env)


def due(kind: str, rank: int, step: int, env: Mapping[str, str] = os.environ) -> bool:
    """Whether a fault of ``kind`` is asked for on ``rank`` at global ``step`` in this run."""
    text = env.get(ENV)
    if not text:
        return False
    restart = restart_count(env)
    return any(f.applies(kind, rank, step, restart) for f in parse(text))
