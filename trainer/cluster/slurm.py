"""SLURM: rendering and submitting sbatch jobs.

Reading the allocation from the environment lives in the launch layer
(:mod:`data_pipelines.launch`, re-exported here): under ``srun`` the node count and the tasks
(= devices) per node are SLURM's, never typed twice: ``trainer.devices=auto`` and
``trainer.num_nodes=null`` take them, and any other value must match them or the job stops at once
naming both numbers (instead of hanging in DDP's rendezvous).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from data_pipelines.launch import Allocation, SlurmConfigError, allocation, resolve_devices  # noqa: F401


# --- sbatch rendering and submission ---------------------------------------------------------


def sbatch_template() -> Path:
    """``slurm/train.sbatch``: package data when installed, the repo's in a checkout."""
    try:
        import importlib.resources

        path = Path(str(importlib.resources.files("trainer.slurm_scripts"))) / "train.sbatch"
        if path.is_file():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"


@dataclass
class JobSpec:
    """The #SBATCH options ``submit`` sets; None keeps the template's value."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: one per GPU (one per node for CPU jobs)
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    signal_seconds: int | None = None  # USR1 this many seconds before the time limit

    def options(self) -> dict[str, str | None]:
        """Option -> value; a None value removes the template's line."""
        opts: dict[str, str | None] = {
            "nodes": str(self.nodes),
            "ntasks-per-node": str(self.tasks_per_node or max(1, self.gpus_per_node)),
            # A CPU job must not ask for GPUs at all.
            "gpus-per-node": str(self.gpus_per_node) if self.gpus_per_node > 0 else None,
        }
        for key, value in (("cpus-per-task", self.cpus_per_task), ("time", self.time),
                           ("partition", self.partition), ("account", self.account),
                           ("job-name", self.job_name)):
            if value is not None:
                opts[key] = str(value)
        if self.signal_seconds is not None:
            opts["signal"] = f"USR1@{self.signal_seconds}"
        return opts


def add_job_arguments(parser, *, many: bool = False) -> None:
    """The SLURM flags of ``submit`` (and of ``study --submit``, ``many`` jobs at once)."""
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 makes CPU jobs (gloo)" if many else "0 makes a CPU job (gloo)")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU (1 for CPU jobs)")
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--time", default=None, help="HH:MM:SS or D-HH:MM:SS")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--signal-seconds", type=int, default=None,
                        help="send USR1 this many seconds before the time limit (checkpoint + requeue); default 180")


def job_spec(args, job_name: str) -> JobSpec:
    """A JobSpec from the flags ``add_job_arguments`` defined."""
    return JobSpec(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition, account=args.account,
        job_name=job_name, signal_seconds=args.signal_seconds,
    )


_SBATCH_LINE = re.compile(r"^#SBATCH --([a-z-]+)=(.*)$")


def render_script(spec: JobSpec, overrides: list[str]) -> str:
    """The sbatch script for a job: the template with this job's options and overrides.

    Every value is shell-quoted (``shlex.quote``), so a job name or an override with ``;``,
    spaces or ``$(...)`` stays text. A CPU job (``gpus_per_node=0``) trains on the CPU (gloo).
    """
    opts = spec.options()
    lines, header_end = [], 0
    for line in sbatch_template().read_text().splitlines():
        m = _SBATCH_LINE.match(line)
        if m and m.group(1) in opts:
            value = opts.pop(m.group(1))
            if value is None:
                continue
            line = f"#SBATCH --{m.group(1)}={shlex.quote(value)}"
        lines.append(line)
        if m:
            header_end = len(lines)
    lines[header_end:header_end] = [f"#SBATCH --{k}={shlex.quote(v)}" for k, v in opts.items() if v is not None]
    items = list(overrides)
    if spec.gpus_per_node == 0:
        items = ["trainer.accelerator=cpu", *items]
    text = "\n".join(lines) + "\n"
    marker = "# The run directory derives"
    at = text.index(marker)
    baked = (
        "# Config overrides of this job, rendered by `imagenet-trainer submit`; arguments given to\n"
        "# sbatch after the script come after them and win.\n"
        f"set -- {' '.join(shlex.quote(i) for i in items)} \"$@\"\n\n"
    )
    return text[:at] + baked + text[at:]


def sbatch_command(script_path: str, wait: bool) -> list[str]:
    return ["sbatch", "--parsable", *(["--wait"] if wait else []), script_path]


def submit(spec: JobSpec, overrides: list[str], *, dry_run: bool, wait: bool, script_dir: Path) -> int:
    """Render and submit; prints the job id. Returns the exit code (the job's with ``wait``)."""
    script = render_script(spec, overrides)
    if dry_run:
        print(script, end="")
        return 0
    script_dir.mkdir(parents=True, exist_ok=True)
    path = script_dir / f"train-{os.getpid()}.sbatch"
    path.write_text(script)
    env = {**os.environ, "IMAGENET_TRAINER_PYTHON": os.environ.get("IMAGENET_TRAINER_PYTHON", sys.executable)}
    cmd = sbatch_command(str(path), wait)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    job_id = proc.stdout.readline().strip().split(";")[0]
    if job_id:
        print(f"submitted job {job_id} ({path})", flush=True)
    rest = proc.stdout.read()
    code = proc.wait()
    if rest.strip():
        print(rest, end="")
    if not job_id:
        print("imagenet-trainer: sbatch did not return a job id", file=sys.stderr)
        return code or 1
    return code
