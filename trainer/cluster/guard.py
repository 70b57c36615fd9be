"""Non-finite steps and loss spikes: skip, roll back, or stop as diverged (``guard.*``).

**Skip.** A step whose gradients are not finite (NaN or inf anywhere) changes nothing: the weights,
the optimiser state and the BatchNorm running statistics stay as they were before it. The
decision is taken from the gradients after DDP's all-reduce (``on_before_optimizer_step``), which
are the same on every rank, so every rank skips the same steps; a NaN loss on one rank makes the
all-reduced gradients NaN everywhere. The loss itself is each rank's own and is not used for the
decision (a rank whose loss alone were read would skip alone and the replicas would drift apart).

It is decided on the device, with no host sync: at the start of a step the guard copies the weights,
the BatchNorm buffers and the optimiser's state tensors into buffers it keeps (one foreach copy);
after the optimiser's step, ``torch.where(finite, new, saved)`` keeps either the step's result or
the copy. This works for every optimiser of ``trainer/recipe/optim.py`` alike (torch's SGD/AdamW,
fused or foreach, and timm's LARS/LAMB, which take no ``found_inf``), at the cost of one copy of the
weights and optimiser state in memory and two passes over them per step (bench/guard_overhead.py).
torch's fused SGD/AdamW could instead skip inside their kernel (their ``found_inf`` argument, which
GradScaler uses), but timm's optimisers cannot, and a step count left behind (AdamW's ``step`` on
the host) is harmless. Skipped steps still advance the lr schedule. The EMA
(trainer/recipe/ema.py) updates after the guard has restored a skipped step, so it averages finite
weights only; the epoch's mean training loss leaves non-finite losses out (module.py).

**Counting.** The skip count, the longest run of consecutive skips and each step's loss are kept
in small device tensors. Every ``guard.check_every_n_steps`` optimiser steps the host reads them
back in one transfer (one host sync per check, none per step), and every rank's verdict is
all-reduced, so every rank rolls back at the same step:

- more than ``guard.max_skips`` consecutive skips, or
- a loss more than ``guard.spike_zscore`` standard deviations above the mean of the previous
  ``guard.window`` steps' finite losses (:class:`SpikeDetector`; each rank's own losses, the
  verdicts OR-ed)

raise :class:`Rollback`. trainer/run.py's ``fit`` then resumes from the newest loadable checkpoint
written before the trouble began, with the data advanced past every batch fed since it (PaLM's
remedy: the batches that led to the spike are not fed again). After ``guard.max_rollbacks``
rollbacks, or when there is no checkpoint to go back to, it raises :class:`Diverged` (exit code 13,
trainer/cluster/exits.py) with what to try.

``guard/skipped_steps`` and ``guard/rollbacks`` are logged at every logging step (metrics.csv, W&B).

**Fault injection** (tests only, trainer/cluster/faults.py): ``IMAGENET_TRAINER_FAULT=nan@RANK:STEP``
makes that rank's logits NaN for the STEP-th batch fed (counted in optimiser steps, from 0, across
rollbacks: a rolled-back run does not feed the batches it skipped, so it does not see their NaN again).
The variable is read once at the fit's start; unset, nothing is hooked.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import deque
from typing import Iterable, Optional

import pytorch_lightning as pl
import torch

from trainer.cluster import exits, faults

log = logging.getLogger("imagenet_trainer")


class Rollback(Exception):
    """Raised on every rank at the same step: resume from the checkpoint before ``bad_from_step``,
    skipping the data up to ``position`` (epoch, batches done in it)."""

    def __init__(self, reason: str, *, step: int, bad_from_step: int, position: tuple[int, int]) -> None:
        self.reason, self.step, self.bad_from_step, self.position = reason, step, bad_from_step, position
        super().__init__(f"{reason} at step {step}: rolling back to a checkpoint from before step {bad_from_step}")


class Diverged(Exception):
    """The run stops: exit code 13 (``exits.DIVERGED``)."""

    exit_code = exits.DIVERGED.code

    def __init__(self, what: str) -> None:
        super().__init__(
            f"diverged: {what}. Try a lower optim.lr (or a longer optim.warmup_epochs), gradient clipping "
            f"(trainer.gradient_clip_val=1.0), or look for bad data in the batches named above; the run "
            f"directory's checkpoints are kept")


@dataclasses.dataclass
class RollbackState:
    """What a fit carries from one attempt to the next within one process."""

    rollbacks: int = 0
    skip_to: Optional[tuple[int, int]] = None  # (epoch, batches done): the data position to resume at
    bad_from_step: Optional[int] = None  # resume from a checkpoint at or before this global step
    fed_offset: int = 0  # batches (optimiser steps) skipped by rollbacks: fault steps count batches fed
    reasons: list = dataclasses.field(default_factory=list)

    def record(self, rollback: Rollback, resumed_step: int, max_rollbacks: int) -> None:
        self.reasons.append(rollback.reason)
        if self.rollbacks >= max_rollbacks:
            raise Diverged(f"{rollback} - after {self.rollbacks} rollbacks (guard.max_rollbacks="
                           f"{max_rollbacks}); before: {'; '.join(self.reasons[:-1]) or 'none'}")
        self.rollbacks += 1
        self.skip_to = rollback.position
        self.bad_from_step = rollback.bad_from_step
        self.fed_offset += max(0, rollback.step - resumed_step)


class SpikeDetector:
    """Loss spikes: a finite loss more than ``zscore`` standard deviations above the mean of the
    previous ``window`` finite losses (from ``min_history`` of them on). Non-finite losses are the
    skip's business and are left out."""

    def __init__(self, zscore: float, window: int, min_history: Optional[int] = None) -> None:
        self.zscore = zscore
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = min_history if min_history is not None else max(10, window // 2)

    def add(self, losses: Iterable[float]) -> Optional[int]:
        """Feed losses in step order; the index (in ``losses``) of the first spike, or None."""
        for i, loss in enumerate(losses):
            if not math.isfinite(loss):
                continue
            if len(self.history) >= self.min_history:
                n = len(self.history)
                mean = sum(self.history) / n
                std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / max(1, n - 1))
                if std > 0 and (loss - mean) / std > self.zscore:
                    return i
            self.history.append(loss)
        return None


class SkipGuard:
    """The device-side skip of one optimiser step (see the module doc), apart from Lightning.

    ``save(params, buffers, optimizer)`` before the step's forward; ``decide(params)`` once the
    gradients are final (all-reduced, before clipping); ``restore(optimizer)`` after the optimiser's step.
    """

    def __init__(self) -> None:
        self._live: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        self._state_keys: set = set()
        self.ok: Optional[torch.Tensor] = None

    @staticmethod
    def _state(optimizer: torch.optim.Optimizer, device: torch.device) -> list[tuple[int, str, torch.Tensor]]:
        out = []
        for p, st in optimizer.state.items():
            for key, t in st.items():
                if torch.is_tensor(t) and t.is_floating_point() and t.device == device:
                    out.append((id(p), key, t))
        return out

    @torch.no_grad()
    def save(self, tensors: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        device = tensors[0].device
        state = self._state(optimizer, device)
        live = tensors + [t for _, _, t in state]
        if len(live) != len(self._live) or any(a is not b for a, b in zip(live, self._live)):
            self._saved = [t.detach().clone() for t in live]  # (re)allocated when the set changes
            self._live = live
            self._state_keys = {(pid, key) for pid, key, _ in state}
        else:
            torch._foreach_copy_(self._saved, live)
        self._optimizer = optimizer

    @torch.no_grad()
    def decide(self, params: Iterable[torch.Parameter]) -> torch.Tensor:
        """A 0-dim bool tensor on the device: whether every gradient is finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            self.ok = None
            return torch.ones((), dtype=torch.bool)
        norms = torch._foreach_norm(grads)
        self.ok = torch.stack([n.float() for n in norms]).sum().isfinite()
        return self.ok

    @torch.no_grad()
    def restore(self) -> None:
        """Keep the step's result where ``ok``, else the saved tensors; optimiser state created by
        this step (its first) is zeroed when the step is skipped."""
        ok = self.ok
        if ok is None:
            return
        for live, saved in zip(self._live, self._saved):
            torch.where(ok, live, saved, out=live)
        device = self._live[0].device if self._live else ok.device
        for pid, key, t in self._state(self._optimizer, device):
            if (pid, key) not in self._state_keys:
                torch.where(ok, t, torch.zeros((), dtype=t.dtype, device=t.device), out=t)
        self.ok = None


class NonFiniteGuard(pl.Callback):
    """Skips non-finite steps on the device, counts them, and rolls back or stops (module doc).
    ``state``: carried across the rollbacks of one ``fit`` (trainer/run.py)."""

    def __init__(self, *, max_skips: int, spike_zscore: Optional[float], window: int, check_every_n_steps: int,
                 state: Optional[RollbackState] = None) -> None:
        self.max_skips = max_skips
        self.check_every = check_every_n_steps
        self.spikes = SpikeDetector(spike_zscore, window) if spike_zscore is not None else None
        self.state = state or RollbackState()
        self.skip = SkipGuard()
        self._counts: Optional[torch.Tensor] = None  # [skipped total, current run, longest run since the check]
        self._losses: Optional[torch.Tensor] = None  # each step's loss since the last check
        self._last_step = -1
        self._last_check = 0
        self._nan_faults: list[faults.Fault] = []
        self._poison = False
        self._hook = None

    def rollback_state(self, state: RollbackState) -> None:
        """Use ``state``: the rollbacks so far of this ``fit`` (trainer/run.py)."""
        self.state = state

    # --- set-up ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._align_epoch = None
        dm = trainer.datamodule
        if stage != "fit" or self.state.skip_to is None or dm is None:
            return
        # The batches fed between the checkpoint and the rollback are not fed again: the data
        # position Lightning restores from the checkpoint (before it builds the loader, after this
        # hook) is replaced by the rollback's.
        epoch, done = (int(v) for v in self.state.skip_to)
        dm.resume_at(epoch, done)
        self._align_epoch, self._align_done = epoch, done

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self._counts = torch.zeros(3, device=device)
        self._losses = torch.full((self.check_every,), float("nan"), device=device)
        self._rollbacks = torch.tensor(float(self.state.rollbacks))  # a CPU tensor: logged with no copy
        self._nan_faults = [f for f in faults.parse(os.environ.get(faults.ENV, "")) if f.kind == "nan"]
        if self._nan_faults:
            self._restart = faults.restart_count()
            self._hook = pl_module.model.register_forward_hook(self._poison_output)

    def _poison_output(self, module, args, output):
        if self._poison:
            return output * float("nan")
        return None

    # --- each step -------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._align_epoch is not None and trainer.current_epoch == self._align_epoch and batch_idx == 0:
            self._advance_progress(trainer)
        if self._nan_faults:
            step = trainer.global_step + self.state.fed_offset
            self._poison = any(f.applies("nan", trainer.global_rank, step, self._restart) for f in self._nan_faults)
        if batch_idx % trainer.accumulate_grad_batches == 0:  # an accumulation window starts
            tensors = [p for p in pl_module.parameters() if p.requires_grad]
            tensors += [b for b in pl_module.buffers() if b.is_floating_point()]
            self.skip.save(tensors, trainer.optimizers[0])

    def _advance_progress(self, trainer: pl.Trainer) -> None:
        """Lightning's count of the epoch's batches follows the skipped data: the next checkpoint's
        data position (ImageNetDataModule.state_dict) and the epoch's length stay right."""
        self._align_epoch = None
        progress = trainer.fit_loop.epoch_loop.batch_progress
        behind = self._align_done - progress.current.processed
        if behind <= 0:
            return
        if self._align_done >= trainer.num_training_batches:
            # The loader takes an epoch's end as the next epoch's start: this epoch is fed again.
            log.warning("guard: the rollback's window ended with epoch %d: its batches are fed again",
                        trainer.current_epoch)
            return
        for counter in (progress.current, progress.total):
            counter.ready += behind
            counter.started += behind
            counter.processed += behind
            counter.completed += behind
        log.warning("guard: skipped %d batches of epoch %d (fed before the rollback)", behind, trainer.current_epoch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        ok = self.skip.decide(p for p in pl_module.parameters() if p.requires_grad)
        bad = (~ok).float().to(self._counts.device)
        # [total, run, longest]: run = (run + 1) if bad else 0
        total = self._counts[0] + bad
        run = (self._counts[1] + 1) * bad
        self._counts = torch.stack([total, run, torch.maximum(self._counts[2], run)])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.skip.restore()  # before the EMA's update (this callback comes first)
        self._poison = False
        step = trainer.global_step
        if step != self._last_step:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if torch.is_tensor(loss):
                self._losses[(step - 1) % self.check_every] = loss.detach().float()
            self._last_step = step
        pl_module.log("guard/skipped_steps", self._counts[0], on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("guard/rollbacks", self._rollbacks, on_step=True, on_epoch=False, batch_size=1)
        if step > 0 and step % self.check_every == 0 and step != self._last_check:
            self._check(trainer, step)

    # --- the check every guard.check_every_n_steps ----------------------------------------------

    def _check(self, trainer: pl.Trainer, step: int) -> None:
        n = step - self._last_check
        first = self._last_check + 1
        values = torch.cat([self._counts, self._losses]).tolist()  # the one host sync of the check
        total, run, longest = values[0], values[1], values[2]
        losses = values[3:]
        ordered = [losses[(s - 1) % self.check_every] for s in range(max(first, step - self.check_every + 1), step + 1)]
        self._counts = torch.stack([self._counts[0], self._counts[1], self._counts[1]])
        self._losses.fill_(float("nan"))
        reason, bad_from = None, step
        if longest > self.max_skips:
            reason = (f"{int(longest)} consecutive steps with non-finite gradients were skipped "
                      f"(guard.max_skips={self.max_skips}; {int(total)} skipped in all)")
            bad_from = max(0, first - int(longest))
        elif self.spikes is not None:
            spike = self.spikes.add(ordered)
            if spike is not None:
                bad_from = step - len(ordered) + 1 + spike
                reason = (f"a loss spike at step {bad_from} ({ordered[spike]:.4g}, over guard.spike_zscore="
                          f"{self.spikes.zscore} standard deviations above the last {len(self.spikes.history)} steps)")
        self._last_check = step
        verdict = torch.tensor([0.0 if reason is None else 1.0, float(bad_from if reason else step)])
        if trainer.world_size > 1:
            # Every rank's verdict, so that every rank rolls back at this step (each rank's loss is its own).
            flags = trainer.strategy.reduce(verdict[:1].to(trainer.strategy.root_device), reduce_op="max")
            first_bad = -trainer.strategy.reduce(-verdict[1:].to(trainer.strategy.root_device), reduce_op="max")
            if float(flags) > 0 and reason is None:
                reason = "another rank saw a loss spike"
            bad_from = int(first_bad)
        if reason is None:
            return
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if trainer.is_global_zero:
            log.warning("guard: %s; rollback %d of at most the configured guard.max_rollbacks", reason,
                        self.state.rollbacks + 1)
        raise Rollback(reason, step=step, bad_from_step=bad_from, position=(trainer.current_epoch, done))

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
