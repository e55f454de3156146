"""Fine-tuning ICEdit's adapters: the training script, data (folders, lazy parquet), checkpoints."""
