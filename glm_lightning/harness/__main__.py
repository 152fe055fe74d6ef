"""``python -m glm_lightning.harness ARGS``: the harness's command line (``lm_eval ARGS``) with the
``glm`` model registered (importing ``glm_lightning.harness`` registers it)."""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

import glm_lightning.harness  # noqa: F401  (registers the model)

if __name__ == "__main__":
    cli_evaluate()
