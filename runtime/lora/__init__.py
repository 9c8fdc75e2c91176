"""Multi-LoRA serving: PEFT adapters over one base model, mixed in one batch (issue 21)."""
