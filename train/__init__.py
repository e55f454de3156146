"""Fine-tuning: data, the training script, and the miniature shapes world."""
