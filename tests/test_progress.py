"""Progress lines read a step's loss (a host sync for a device tensor) only when they show it."""

from __future__ import annotations

import torch

from fer_dist.progress import Bar, PlainBar


class CountedLoss(torch.Tensor):
    reads = 0

    def __float__(self) -> float:
        CountedLoss.reads += 1
        return super().__float__()


def test_a_plain_bar_reads_the_loss_only_for_the_lines_it_prints(capsys) -> None:
    CountedLoss.reads = 0
    loss = torch.tensor(0.25).as_subclass(CountedLoss)
    bar = PlainBar("round 1", total=100, completed=0, every_s=3600.0)
    for _ in range(50):
        bar.advance(loss=loss, images_per_s=10.0)
    assert CountedLoss.reads == 0 and capsys.readouterr().err == ""
    bar.every_s = 0.0
    bar.advance(loss=loss, images_per_s=10.0)
    assert CountedLoss.reads == 1
    assert "[progress] round 1  step 51/100  loss 0.2500  10 img/s  left " in capsys.readouterr().err


def test_a_rich_bar_reads_the_loss_at_most_twice_a_second() -> None:
    class Sink:
        def update(self, task, advance, extra):
            self.extra = extra

    CountedLoss.reads = 0
    loss = torch.tensor(1.5).as_subclass(CountedLoss)
    sink = Sink()
    bar = Bar(sink, 0)  # type: ignore[arg-type]
    for _ in range(100):
        bar.advance(loss=loss)
    assert CountedLoss.reads == 1 and sink.extra == "loss 1.5000"
