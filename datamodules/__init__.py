"""LightningDataModules and the data pipelines behind them (corpus tokenization, sample packing)."""
