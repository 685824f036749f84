"""Recovery after pruning: LoRA, masked LoRA and masked full fine-tuning."""
