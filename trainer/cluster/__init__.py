"""Running on a cluster: SLURM jobs and the signals that stop them.

    slurm.py       ``imagenet-trainer submit``: the sbatch command of a job, and the allocation
                   a fit reads from srun's environment (the launch layer, data_pipelines/launch.py)
    preemption.py  SIGUSR1/SIGTERM: a checkpoint at a step every rank agrees on, then a requeue
    exits.py       the exit codes of ``fit``: what each means, whether a requeue can help
    failfast.py    a dead or hung rank ends every rank soon: process-group timeouts, the watchdog
    watchdog.py    the step-progress watchdog thread: stacks dumped, exit 10
    failures.py    RUN_DIR/failures.jsonl, the dumps in RUN_DIR/failures/, the W&B summary
    health.py      the health check before the first step: all-reduce, GPU, first image; exit 11
    faults.py      IMAGENET_TRAINER_FAULT: crash, hang... injected for the tests
    supervise.py   the sbatch script's srun under a supervisor: a failed task requeues the job
                   without its node (up to run.max_restarts), or the job's last line names the cause
    guard.py       non-finite steps skipped on every rank alike; spikes and runs of them roll back

Nothing is imported here: ``import trainer`` and the CLI stay cheap.
"""
