"""What runs or extends the model: the HF reference loss, the future predictor head."""
