"""Training tasks: each names its parts and supplies a pure step."""
