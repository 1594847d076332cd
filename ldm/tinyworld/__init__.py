"""The tiny world: the project's own tiny SD v1 base model, its metric models, and the CPU demo."""
