"""Recipes for training loops tinyprop does not own: PyTorch Lightning
(:mod:`tinyprop.integrations.lightning`) and the transformers ``Trainer``
(:mod:`tinyprop.integrations.transformers`). Each module imports its framework when it is
imported itself, and names the extra that installs it when the framework is missing."""
