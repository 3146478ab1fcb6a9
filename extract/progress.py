"""Progress of an extraction run: a tqdm bar on a terminal, else (batch jobs, torchrun) a log line per tar."""
from __future__ import annotations

import logging
import time

from tqdm import tqdm

log = logging.getLogger("comad.extract")


class Progress:
    """Tars done: a tqdm bar on a terminal, else (batch jobs, torchrun) a log line per tar; rank 0 only."""

    def __init__(self, total: int, done: int, show: bool):
        self.total, self.done, self.done_before, self.t0 = total, done, done, time.time()
        self.bar = tqdm(total=total, initial=done, unit="tar", desc="extract", disable=None if show else True)
        self.log = show and self.bar.disable

    def tar_done(self, images: int) -> None:
        self.done += 1
        elapsed = max(time.time() - self.t0, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix_str(f"{images} img, {images / elapsed:.1f} img/s")
        if self.log:
            eta = elapsed / (self.done - self.done_before) * (self.total - self.done)
            log.info("%d/%d tars, %d images, %.1f images/s, ETA %.0f s", self.done, self.total, images,
                     images / elapsed, eta)
