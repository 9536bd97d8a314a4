"""Training: the fine-tuning loop, linear probe, resume state, AdamW, augmentation."""
