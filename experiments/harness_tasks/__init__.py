"""lm-evaluation-harness task definitions over local files (YAML), read with ``--include_path``
or by ``exp=harness``; ``utils`` holds their document functions."""
