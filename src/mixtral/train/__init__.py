"""Training: load-balancing and z losses, LoRA, the trainer."""
