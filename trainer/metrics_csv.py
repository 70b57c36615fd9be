"""``RUN_DIR/metrics.csv``: the run's whole record, kept across resumes.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts ("Previous log files in
this directory will be deleted"), so every requeued job kept only its last segment. This one keeps
the rows an interrupted job wrote up to the checkpoint it resumes from, drops the rows written after
that checkpoint (their steps are trained again, and logged again), and appends. metrics.csv is the
record that always exists: W&B may be off, or offline on a cluster without internet.
"""
from __future__ import annotations

import csv
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from data_pipelines import files


class RunCSVLogger(CSVLogger):
    """A CSVLogger writing ``save_dir/metrics.csv`` (no version folders) that, when ``resume_step``
    is given, keeps the file's rows of the steps before it and appends after them. ``resume_step``:
    the step the resumed run logs first (``first_logged_step`` of its checkpoint); None: a fresh
    run, which starts a new file."""

    def __init__(self, save_dir: str | Path, resume_step: int | None = None) -> None:
        super().__init__(save_dir=str(save_dir), name="", version="")
        self._resume_step = resume_step

    @property
    @rank_zero_experiment  # as Lightning's: other ranks get a no-op and never touch the file
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self._resume_step)
        return self._experiment


class _KeepingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)  # calls _check_log_dir_exists

    def _check_log_dir_exists(self) -> None:
        """Instead of Lightning's delete: keep the rows before the resume step, with their header,
        so that the first save appends to them."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._resume_step is None:
            path.unlink()  # a fresh run (no checkpoint to resume from) starts a fresh record
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if _step(row) is not None and _step(row) < self._resume_step]
        # A crash here leaves the old file or the trimmed one, never half of it.
        with files.atomic_path(path, fsync=False) as tmp, tmp.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        # Lightning's writer appends under its known keys and rewrites the file when new ones come.
        self.metrics_keys = sorted(header)


def _step(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


def first_logged_step(ckpt: dict) -> int:
    """The step a run resumed from checkpoint ``ckpt`` logs first: Lightning logs with the count
    of batches that stepped the optimiser (``_batches_that_stepped``), which it restores."""
    loop = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(loop.get("_batches_that_stepped", ckpt.get("global_step", 0)))
