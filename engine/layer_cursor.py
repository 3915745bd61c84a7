"""What every forward object shares (`LayerwiseForward`, `OverlappedForward`, `IdleForward`): its layer ranges run in
order, one after the other, and logits only once every layer ran."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner


class LayerCursor:
    runner: ModelRunner
    next_layer: int = 0  # the first layer not run yet

    @property
    def done(self) -> bool:
        return self.next_layer == self.runner.num_layers

    def _check_start(self, start: int) -> None:
        if start != self.next_layer:
            raise ValueError(f"layer ranges must be consecutive: expected start {self.next_layer}, got {start}")

    def _check_done(self) -> None:
        if not self.done:
            raise ValueError(f"logits need all {self.runner.num_layers} layers; ran {self.next_layer}")
