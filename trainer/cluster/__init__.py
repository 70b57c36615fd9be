"""Running on a cluster: SLURM jobs and the signals that stop them.

    slurm.py       ``imagenet-trainer submit``: the sbatch command of a job, and the allocation
                   a fit reads from srun's environment (the launch layer, data_pipelines/launch.py)
    preemption.py  SIGUSR1/SIGTERM: a checkpoint at a step every rank agrees on, then a requeue

Nothing is imported here: ``import trainer`` and the CLI stay cheap.
"""
