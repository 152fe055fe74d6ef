"""SuperGLUE as cloze questions: patterns and verbalizers as data, and the model-input encoding.

`encode_example(task, example, tokenizer, pattern_id=..., max_seq_length=...)` turns one
`datamodules.superglue.read_split` example into model inputs (paper §2.3; official `tasks/superglue/pvp.py`);
`augment_training_examples(task, examples)` applies the training-set transformations of the official
`tasks/superglue/dataset.py`.
"""

from glm_lightning.cloze.encoding import encode_example, verbalizer_ids
from glm_lightning.cloze.patterns import (
    MASK,
    MULTI_TOKEN_TASKS,
    PATTERNS,
    Pattern,
    Shortenable,
    get_pattern,
)
from glm_lightning.cloze.preprocess import answer_candidates, augment_training_examples

__all__ = [
    "MASK",
    "MULTI_TOKEN_TASKS",
    "PATTERNS",
    "Pattern",
    "Shortenable",
    "answer_candidates",
    "augment_training_examples",
    "encode_example",
    "get_pattern",
    "verbalizer_ids",
]
