"""The training loop, the task interface, optimizers and metric writers."""
