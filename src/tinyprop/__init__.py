"""tinyprop: TinyPropv2 dynamic sparse backpropagation for PyTorch."""
