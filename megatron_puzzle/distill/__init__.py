"""Distillation: block-level (BLD) and global (GKD) knowledge distillation from the parent."""
