"""Bottom floor: bytes in and out (checkpoints, transformers folders, staged writes) and who is trusted."""
