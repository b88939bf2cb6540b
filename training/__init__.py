"""Training: the ParaDiffusion model in three stages on DeepSpeed, export and generation."""
