"""The QAConv-GS learning-rate schedule: adaptive one-time decay, or a fixed decay epoch."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class EpochSchedule:
    """Decides after each epoch whether to decay the LR (once, x0.1) and when training stops.

    ``step_factor < 1`` (adaptive, official default 0.7): the loss of the 2nd epoch is the base; after
    the first epoch e whose loss drops below step_factor x base, decay and stop at min(max_epochs,
    e + e // 2). ``step_factor >= 1``: decay after epoch ``int(step_factor)``, stop at max_epochs.
    """

    step_factor: float = 0.7
    max_epochs: int = 60
    final_epochs: int = 0
    base_loss: float | None = None
    lr_stepped: bool = False

    def __post_init__(self):
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if self.step_factor <= 0:
            raise ValueError(f"step_factor must be > 0, got {self.step_factor}")
        if self.final_epochs == 0:
            self.final_epochs = self.max_epochs

    def end_epoch(self, epoch: int, loss: float) -> bool:
        """Record the average loss of 1-based ``epoch``; True when the LR should decay now."""
        if self.step_factor >= 1:
            decay = not self.lr_stepped and epoch == int(self.step_factor)
        else:
            if epoch == 2:
                self.base_loss = loss
            decay = not self.lr_stepped and self.base_loss is not None and loss < self.step_factor * self.base_loss
            if decay:
                self.final_epochs = min(self.max_epochs, epoch + epoch // 2)
        self.lr_stepped = self.lr_stepped or decay
        return decay

    def done(self, epoch: int) -> bool:
        return epoch >= self.final_epochs

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
