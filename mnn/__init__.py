"""mnn: manual neural networks."""
