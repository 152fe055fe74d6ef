"""LightningModules: one training objective per file."""
