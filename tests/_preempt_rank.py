"""One rank of a 2-process DDP (gloo) fit with RequeueOnSignal, launched by tests/test_preemption.py
as srun would: a separate process per rank, each receiving its own signals.

    python tests/_preempt_rank.py ROOT OUT RANK PORT SIGNAL_AT BACKEND [RESUME_CKPT]

SIGNAL_AT = "RANK:BATCH:SIG" makes that rank send SIGSIG (USR1 or TERM) to itself, and only
itself, at the end of that batch of epoch 0; "-" sends none. BACKEND is data.backend (torchvision
or dali_cpu). Writes OUT/rank{RANK}.json: how fit ended, the labels of every batch it trained on
(with one image per class, the sample ids), and the ops of batches 2-5 that make the host wait
for a GPU.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

root, out, rank, port, signal_at, backend = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
resume = sys.argv[7] if len(sys.argv) > 7 else None
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank))

import pytorch_lightning as pl  # noqa: E402

from data_pipelines.datamodule import ImageNetDataModule  # noqa: E402
from data_pipelines.specs import DataSpec  # noqa: E402
from trainer.callbacks import AtomicCheckpointIO  # noqa: E402
from trainer.recipe.models import build_model  # noqa: E402
from trainer.module import Classifier  # noqa: E402
from trainer.cluster.preemption import Preempted, RequeueOnSignal  # noqa: E402
from trainer.recipe.specs import OptimSpec  # noqa: E402
from tests.test_fast_path import HOST_SYNC_OPS, _OpRecorder  # noqa: E402

# The requeue command: appends the rank that ran it (only rank 0 may) to OUT/requeued.
REQUEUE = [sys.executable, "-c", f"open({str(out / 'requeued')!r}, 'a').write('{rank}\\n')"]


class Record(pl.Callback):
    def __init__(self):
        self.seen, self.recorder = [], _OpRecorder()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append([trainer.current_epoch, batch_idx, trainer.global_step, batch[1].tolist()])
        if trainer.current_epoch != 0 or resume is not None:
            return
        if batch_idx == 1:
            self.recorder.__enter__()
        elif batch_idx == 5:
            self.recorder.__exit__(None, None, None)
        who, when, sig = (signal_at.split(":") + ["", "", ""])[:3]
        if who == str(rank) and when == str(batch_idx):
            os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))


pl.seed_everything(0)
record = Record()
dm = ImageNetDataModule(DataSpec(root=root, backend=backend, batch_size=2, image_size=32, val_resize=32,
                                 num_workers=1, seed=3, filelist_cache=False), on_gpu=False)  # decoding (it reads values) outside the recorder
classes = len(dm.classes)
module = Classifier(build_model("resnet20", classes), num_classes=classes, batch_size=2,
                    optim=OptimSpec(lr=0.1, momentum=0.9))
trainer = pl.Trainer(accelerator="cpu", devices=2, num_nodes=1, strategy="ddp", max_epochs=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[RequeueOnSignal(out, requeue=REQUEUE), record], use_distributed_sampler=False,
                     num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(out),
                     plugins=[AtomicCheckpointIO()])
result = {"seen": record.seen}
try:
    trainer.fit(module, dm, ckpt_path=resume)
    result.update(ended="finished")
except Preempted as stop:
    result.update(ended=signal.Signals(stop.signum).name, checkpoint=str(stop.checkpoint), requeued=stop.requeued,
                  exit_code=stop.exit_code)
result.update(global_step=trainer.global_step, recorded=len(record.recorder.ops),
              sync_ops=sorted({op for op in record.recorder.ops if any(s in op for s in HOST_SYNC_OPS)}))
(out / f"rank{rank}.json").write_text(json.dumps(result))
