"""The library's one-line error type, in a module of its own so that code which raises it (the model)
imports neither OmegaConf nor the config schema."""


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the offending key."""
