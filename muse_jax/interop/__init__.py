"""Reading other frameworks' checkpoint files (no PyTorch needed)."""
