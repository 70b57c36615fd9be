# Makes slurm/ installable as trainer.slurm_scripts (see setup.py), so that an installed
# `imagenet-trainer submit` finds train.sbatch from any directory.
