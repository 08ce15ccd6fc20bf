"""``qaconv`` with one kill injected, for tests/test_kill_resume.py.

``python _faulty_qaconv.py FAULT qaconv-arguments...`` (also as the script of ``torchrun``), where FAULT is

* ``none``: no fault;
* ``step:E:S``: SIGKILL at the start of training step S (0-based) of epoch E, inside the epoch;
* ``ckpt:E``: SIGKILL in the middle of writing epoch E's checkpoint (half of it in the temporary file);
* ``metrics:E``: SIGKILL after epoch E's checkpoint is renamed into place, before its metrics row.

The kill hits the process whose ``RANK`` equals ``QACONV_FAULT_RANK`` (default 0; a single process is rank 0).
"""

import io
import os
import signal
import sys

import torch

from qaconv import cli
from qaconv.engine import checkpoint as checkpoint_module
from qaconv.engine import trainer as trainer_module


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def inject(fault: str) -> None:
    kind, *where = fault.split(":")
    if kind == "none" or os.environ.get("RANK", "0") != os.environ.get("QACONV_FAULT_RANK", "0"):
        return
    epoch = int(where[0])
    Trainer = trainer_module.Trainer
    if kind == "step":
        real_epoch, real_step, target = Trainer.train_epoch, Trainer._step, int(where[1])

        def train_epoch(self, e):
            self._fault_epoch, self._fault_steps = e, 0
            return real_epoch(self, e)

        def step(self, images, targets):
            if self._fault_epoch == epoch and self._fault_steps == target:
                die()
            self._fault_steps += 1
            return real_step(self, images, targets)

        Trainer.train_epoch, Trainer._step = train_epoch, step
    elif kind == "ckpt":
        real_save = trainer_module.save_checkpoint

        def save(state, path):
            if state["epoch"] != epoch:
                return real_save(state, path)

            def half_then_die(f):
                buf = io.BytesIO()
                torch.save({"format": checkpoint_module.FORMAT, **state}, buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()

            checkpoint_module.atomic_write(path, half_then_die)

        trainer_module.save_checkpoint = save
    elif kind == "metrics":
        real_append = trainer_module.append_jsonl

        def append(path, row):
            if row.get("type") == "epoch" and row["epoch"] == epoch:
                die()
            real_append(path, row)

        trainer_module.append_jsonl = append
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(cli.main(sys.argv[2:]))
