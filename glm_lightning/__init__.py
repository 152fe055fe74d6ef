"""GLM (General Language Model) pretraining and finetuning with PyTorch Lightning."""
