"""Experiment entry points: configuration loading, the job registry and the command line."""
