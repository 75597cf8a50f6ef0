"""Training: the Gen-1 LightningModule, EMA, the tiny world's component trainers, the prior's
trainer, and building a Gen1 from its checkpoint or release file."""
