"""Data, augmentation, evaluation and the Accelerate training loop."""
