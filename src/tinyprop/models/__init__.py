"""MCU-sized reference models, one per dataset (MLPerf Tiny spirit), and their size summary.

Example:
    >>> from tinyprop import models
    >>> net = models.build("speech_commands", input_shape=(1, 49, 10))
    >>> print(models.summary(net, (1, 49, 10)))
"""

from tinyprop.models.autoencoder import reconstruction_loss
from tinyprop.models.registry import (
    Reference,
    build,
    is_autoencoder,
    names,
    reference,
    variants,
)
from tinyprop.models.summary import ModelSummary, summary

__all__ = [
    "ModelSummary",
    "Reference",
    "build",
    "is_autoencoder",
    "names",
    "reconstruction_loss",
    "reference",
    "summary",
    "variants",
]
