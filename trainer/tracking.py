"""Weights & Biases tracking through Lightning's ``WandbLogger``.

One W&B run per job: only global rank 0 creates it (Lightning gives the other ranks a dummy), and
it is created lazily in ``setup``, once the strategy knows the true global rank. The run id is
written to ``RUN_DIR/wandb_run_id``; a resumed or requeued job reads it back and continues the same
run. Nothing here may stop training: a W&B that is not installed, has no API key, or cannot be
reached degrades to offline (then to no-op) with a warning, never to an exception.

Mode resolution (``resolve_mode``), from the configured ``logger.wandb.mode``:

- ``disabled``: no W&B at all (wandb is not even imported).
- ``offline``: the run is written under ``RUN_DIR/wandb/offline-run-*``; ``wandb sync`` uploads it.
- ``online``: online, unless the environment says otherwise: ``WANDB_MODE=offline|dryrun`` or
  ``WANDB_MODE=disabled`` win (they can only make the run less online), and without an API key
  (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` or a netrc entry for the W&B host) the run is
  offline, said once.

When ``wandb.init`` fails anyway (server unreachable: after ``WANDB_INIT_TIMEOUT``, 90 s by
default), the run falls back to offline, then to disabled.
"""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.logger import DummyExperiment, rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from data_pipelines import files, launch

log = logging.getLogger("imagenet_trainer")

MODES = ("online", "offline", "disabled")
RUN_ID_FILE = "wandb_run_id"
DEFAULT_HOST = "https://api.wandb.ai"

_said: set[str] = set()  # messages already shown by this process: each is said once


def _say_once(key: str, message: str) -> None:
    """A warning on global rank 0 only, at most once per process."""
    if rank_zero_only.rank == 0 and key not in _said:
        _said.add(key)
        log.warning(message)


def wandb_importable() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def has_api_key(environ: Mapping[str, str], netrc_path: Optional[Path] = None) -> bool:
    """Whether W&B credentials are configured, without asking the server.

    Looks where wandb looks: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, then the netrc file
    (``$NETRC`` or ``~/.netrc``, written by ``wandb login``) for the host of ``WANDB_BASE_URL``.
    """
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if netrc_path is None:
        netrc_path = Path(environ.get("NETRC") or Path.home() / ".netrc")
    host = urlsplit(environ.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    try:
        return netrc.netrc(str(netrc_path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(configured: str, environ: Mapping[str, str], netrc_path: Optional[Path] = None) -> tuple[str, str]:
    """The mode a run will use, and why (a sentence for the log; empty when it is as configured)."""
    if configured not in MODES:
        raise ValueError(f"logger.wandb.mode={configured!r} is not allowed; choose one of: {', '.join(MODES)}")
    if configured != "online":
        return configured, ""
    env_mode = (environ.get("WANDB_MODE") or "").lower()
    if env_mode == "disabled":
        return "disabled", "WANDB_MODE=disabled is set in the environment"
    if env_mode in ("offline", "dryrun"):
        return "offline", f"WANDB_MODE={env_mode} is set in the environment"
    if not has_api_key(environ, netrc_path):
        return "offline", (
            "no W&B API key is configured (WANDB_API_KEY, or `wandb login`), so W&B logs offline"
        )
    return "online", ""


def default_group(group: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """``group`` if set, else the SLURM job id (the array's id for an array job), else None."""
    return group or launch.job_group(environ)


def read_run_id(run_dir: str | Path) -> Optional[str]:
    """The W&B run id saved in ``run_dir`` by an earlier job, if any."""
    path = Path(run_dir) / RUN_ID_FILE
    try:
        run_id = path.read_text().strip()
    except FileNotFoundError:
        return None
    return run_id or None


def _write_run_id(run_dir: Path, run_id: str) -> None:
    files.write_atomic(run_dir / RUN_ID_FILE, run_id + "\n", fsync=False)


class TrainerWandbLogger(WandbLogger):
    """``WandbLogger`` that never fails training: falls back online -> offline -> disabled when
    ``wandb.init`` fails, drops W&B calls (with one warning) once any of them raises, saves the
    run id in ``run_dir``, keeps the resolved config as the run's config and finishes the run
    when Lightning finalizes the logger."""

    def __init__(self, *, run_dir: Path, mode: str, log_model: Any, **kwargs: Any) -> None:
        super().__init__(offline=False, log_model=log_model if mode == "online" else False, mode=mode, **kwargs)
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb; Lightning always passes it
        self._run_dir = Path(run_dir)
        self._requested_mode = mode
        self._broken = False

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        chain = {"online": ["online", "offline", "disabled"], "offline": ["offline", "disabled"]}
        for mode in chain.get(self._wandb_init.get("mode"), ["disabled"]):
            self._wandb_init["mode"] = mode
            if mode != "online":
                self._log_model = False  # artifacts are uploaded only by online runs
            try:
                run = WandbLogger.experiment.fget(self)
                break
            except Exception as err:  # noqa: BLE001 - W&B must never stop training
                self._experiment = None
                log.warning("W&B: could not start a %s run (%s); trying the next mode", mode, str(err).splitlines()[0])
        else:
            self._broken = True
            self._experiment = DummyExperiment()
            return self._experiment
        if mode != "disabled":
            _write_run_id(self._run_dir, run.id)
        if mode == "offline" and self._requested_mode == "online":
            _say_once("sync", f"W&B run {run.id} is offline: upload it later with "
                              f"`wandb sync {self._run_dir / 'wandb'}/offline-run-*-{run.id}`")
        return run

    def _guarded(self, what: str, fn, *args) -> None:
        if self._broken:
            return
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            self._broken = True
            log.warning("W&B: %s failed (%s); W&B logging is off for the rest of this job, "
                        "metrics are still written to %s", what, err, self._run_dir / "metrics.csv")

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        # The module's hparams hold the resolved config (with num_classes filled in), the classes
        # and their names; the config is what belongs in the run, not lists of 1,000 wnids and words.
        params = dict(params) if isinstance(params, Mapping) else vars(params)
        config = params.get("config")
        payload = config if isinstance(config, Mapping) else {k: v for k, v in params.items()
                                                              if k not in ("classes", "names")}
        self._guarded("logging the config", lambda: self.experiment.config.update(payload, allow_val_change=True))

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        self._guarded("logging metrics", super().log_metrics, metrics, step)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        if rank_zero_only.rank == 0:
            self._guarded("logging a checkpoint artifact", super().after_save_checkpoint, checkpoint_callback)

    @rank_zero_only
    def mark_preempting(self) -> None:
        """Tell W&B the run stops to be requeued, not crashed; the requeued job resumes it."""
        if self._experiment is not None:
            self._guarded("marking the run preempted", self._experiment.mark_preempting)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._guarded("logging checkpoint artifacts", super().finalize, status)
        if self._experiment is not None:
            run, self._experiment = self._experiment, None
            # A later log (fit's final validate) reopens the same run id: resume="allow".
            self._guarded("finishing the run", lambda: run.finish(exit_code=0 if status != "failed" else 1))


def build_wandb_logger(
    *,
    run_dir: str | Path,
    project: str,
    entity: Optional[str],
    name: Optional[str],
    group: Optional[str],
    tags: Sequence[str],
    mode: str,
    log_model: Any,
    config: dict,
    environ: Optional[Mapping[str, str]] = None,
) -> Optional[TrainerWandbLogger]:
    """The W&B logger for a training job, or None when W&B is disabled or not installed.

    ``config`` is the resolved config as plain data: the run's config from its first record, so
    offline runs have it too. ``log_model``: True logs the best and last checkpoints as artifacts
    (aliases ``best``, ``latest``) at the end, "all" each one as it is written, False none; only
    online runs upload artifacts.
    """
    environ = os.environ if environ is None else environ
    run_dir = Path(run_dir)
    resolved, reason = resolve_mode(mode, environ)
    if resolved == "disabled":
        if reason:
            _say_once("mode", f"W&B is disabled: {reason}")
        return None
    if not wandb_importable():
        _say_once("missing", "W&B tracking is off: the wandb package is not installed (pip install "
                             f"'imagenet-trainer[wandb]'); metrics are still written to {run_dir / 'metrics.csv'}")
        return None
    if reason:
        _say_once("mode", f"W&B: {reason}; the run is written under {run_dir / 'wandb'}: upload it "
                          f"later with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
    run_id = read_run_id(run_dir)
    if run_id:
        log.info("W&B: continuing run %s (from %s)", run_id, run_dir / RUN_ID_FILE)
    return TrainerWandbLogger(
        run_dir=run_dir,
        mode=resolved,
        log_model=log_model,
        save_dir=str(run_dir),
        project=project,
        entity=entity,
        name=name or run_dir.name,
        group=default_group(group, environ),
        tags=list(tags),
        id=run_id,
        config=config,
        job_type="train",
    )
