"""Crash-safe training checkpoints: model, optimiser, scheduler and trainer progress, written atomically, resumable."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from ..checks import as_bool
from ..io import atomic_write
from ..networks.pretrained import read_checkpoint

FORMAT = "msam-training-checkpoint/1"
logger = logging.getLogger("msam_components")


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`msam_components.io.atomic_write`: never a half-written checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


class TrainingCheckpoint:
    """Save ``{model, optimizer, lr_scheduler, trainer}`` every ``interval`` epochs; optionally resume at start.

    The file (``ckpt_dir/checkpoint_latest.pt``) is replaced atomically, so a run killed at any moment leaves the last
    complete checkpoint and loses at most ``interval`` epochs. With ``resume=True`` an existing file is loaded when the
    trainer starts (weights, optimiser and scheduler state, epoch and iteration) and training continues from there;
    without a file training starts afresh. ``model.pt``-style weights of the same network load with ``load_pretrained``.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: object | None = None,
        resume: bool = False,
        interval: int = 1,
        filename: str = "checkpoint_latest.pt",
    ) -> None:
        resume = as_bool(resume, "resume")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"checkpoint interval must be a positive integer, got {interval!r}")
        self.path = Path(ckpt_dir) / filename
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.resume, self.interval = resume, interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)

    def state(self, engine: Engine) -> dict:
        """Everything needed to continue the run."""
        state = {
            "format": FORMAT,
            "model": _unwrap(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": {"epoch": engine.state.epoch, "iteration": engine.state.iteration},
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def save(self, engine: Engine) -> None:
        if idist.get_rank() == 0:
            atomic_torch_save(self.state(engine), self.path)
            logger.info(f"saved training checkpoint (epoch {engine.state.epoch}) to {self.path}")

    def load(self, engine: Engine) -> None:
        if not self.resume:
            return
        if not self.path.is_file():
            logger.warning(f"resume requested but {self.path} does not exist: starting from epoch 0")
            return
        ckpt = read_checkpoint(self.path)  # errors name the file (truncated, empty, not a checkpoint, pickled code)
        if ckpt.get("format") != FORMAT:
            raise ValueError(
                f"{self.path} is not a training checkpoint of this project (format {ckpt.get('format')!r})"
            )
        stored, max_epochs = int(ckpt["trainer"]["epoch"]), engine.state.max_epochs
        if max_epochs is not None and stored >= max_epochs:
            raise ValueError(
                f"--resume: {self.path} already holds epoch {stored} but num_epochs is {max_epochs}: nothing is left "
                f"to train; pass --num_epochs larger than {stored} to continue, or drop --resume to start afresh"
            )
        _unwrap(self.network).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in ckpt:
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        engine.state.epoch = int(ckpt["trainer"]["epoch"])
        engine.state.iteration = int(ckpt["trainer"]["iteration"])
        logger.info(f"resumed from {self.path}: continuing after epoch {engine.state.epoch}")
