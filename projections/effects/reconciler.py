"""The periodic reconcile pass that `orderledger worker` and `orderledger serve` run."""

from __future__ import annotations

import logging

from projections.effects.service import Effects
from projections.engine.background import LoopThread

log = logging.getLogger("orderledger.effects")


class Reconciler:
    """Runs a reconcile pass every ``interval`` seconds in a background thread.

    In a healthy system each pass records nothing; a non-zero count means the outbox lost rows
    (a restore from an older backup, say) and they are now pending again.
    """

    def __init__(self, effects: Effects, interval: float) -> None:
        self.effects = effects
        self.interval = interval
        self._background = LoopThread("orderledger-reconcile")
        self._stop = self._background.stopping

    def start(self) -> None:
        self._background.start(self.run)

    def stop(self, timeout: float = 30.0) -> None:
        self._background.stop(timeout)

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()

    def run_once(self) -> int | None:
        """One pass; returns how many effects it recorded (None if the pass failed)."""
        try:
            recorded = self.effects.reconcile()
        except Exception:
            log.exception("reconcile pass failed; trying again next interval")
            return None
        log.info("reconcile pass recorded %d effect(s)", recorded, extra={"recorded": recorded})
        return recorded
