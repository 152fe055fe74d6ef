"""Library messages that tell a user of this project nothing, silenced narrowly by their text.

* Lightning's "Tip" adverts for its cloud products (litlogger, litmodels), printed by every Trainer.
* "Trainer already configured with model summary callbacks": the jobs' summary
  (``glm_lightning.callbacks.SummaryWithoutFlops``) replaces Lightning's on purpose.
* Lightning's own use of a deprecated torch pytree API (``isinstance(treespec, LeafSpec)``).
* "Checkpoint directory ... exists and is not empty": the jobs refuse to start in a run directory
  that has checkpoints unless they resume it, which is when Lightning says this.
"""

from __future__ import annotations

import logging
import warnings

_TIP = "\N{ELECTRIC LIGHT BULB} Tip: "
_DROPPED = (_TIP, "Trainer already configured with model summary callbacks")
_LIGHTNING_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_DROPPED)


def quiet_libraries() -> None:
    """Install the filters (idempotent)."""
    logger = logging.getLogger(_LIGHTNING_LOGGER)
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
