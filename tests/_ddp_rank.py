"""One rank of tests/test_ddp.py's 2-process DDP (gloo) fit, started as srun or torchrun starts a
rank: its own process, with LOCAL_RANK, NODE_RANK and WORLD_SIZE set, so that strategy="ddp" takes
it as launched externally and starts no process itself.

    python tests/_ddp_rank.py OUT RANK

The ranks meet through the file OUT/rendezvous (no port to choose, so none can be taken by another
test run meanwhile). Rank 0 writes the trained weights to OUT/two.pt; then both ranks pass one
barrier before either exits.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

out, rank = Path(sys.argv[1]), int(sys.argv[2])
os.environ.update(WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank), RANK=str(rank))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.test_ddp import HANG_GUARD_S, train  # noqa: E402

# Initialised here, Lightning's DDP uses this group as it is (it would otherwise rendezvous over a port).
dist.init_process_group("gloo", init_method=(out / "rendezvous").as_uri(), rank=rank, world_size=2,
                        timeout=timedelta(seconds=HANG_GUARD_S))
weights = train(2, 4)
if rank == 0:
    torch.save(weights, out / "two.pt")
# No rank leaves (closing its gloo connections) while the other may still be in a collective.
dist.barrier()
dist.destroy_process_group()
