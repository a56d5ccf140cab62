"""Training losses that need networks of their own (perceptual, adversarial)."""
