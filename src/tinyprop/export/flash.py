"""The flash the exported example program needs on a Cortex-M4.

Flash holds the program's code (the runtime, the example's ``main``, newlib with its ``printf``
and libm), the model's initial weights (``const`` arrays of ``tinyprop_model.h``: every weight
and bias, 4 bytes each, also those a memory mode trains, which ``tp_init_mode`` copies into the
arena) and, when ``samples`` are built in (``-DTP_EMBEDDED_SAMPLES``, ``tinyprop_samples.h``),
the samples and labels. The code's figure was measured on the example built with
``arm-none-eabi-gcc -O2 -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16`` (GCC 12.2,
newlib with semihosting): text + data less the weights and samples is about 85 KB and grows by
60 bytes per runtime layer (its entry in the model's layer table); less 60 bytes per layer it
was 84,128-85,244 bytes over the 30 builds of ``benchmarks/results/runtime_cortex_m4.json``,
the user models of ``tests/test_sram.py`` and MLPs of 5, 43 and 83 layers.
``tests/test_sram.py`` fails when a build needs more than its estimate or more than 2 KiB
less. Another compiler or C library needs other figures; replacing ``printf`` by your own
logging saves most of newlib's share.

Example:
    >>> estimate = flash_estimate(parameters=8_372, layer_count=11, built_in_sample_bytes=0)
    >>> estimate.total_bytes, estimate.weight_bytes
    (119696, 33488)
"""

from __future__ import annotations

from dataclasses import dataclass

CODE_BYTES = 85_504  # the runtime, main, newlib and libm: the largest measured, 85,244, and 260
LAYER_CODE_BYTES = 64  # per runtime layer: 60 measured (83 layers: 4,688 more than 5)


@dataclass(frozen=True)
class FlashEstimate:
    """Bytes of flash the exported example needs on a Cortex-M4, by part."""

    code_bytes: int  # the runtime, the example's main, newlib and libm
    weight_bytes: int  # the model's initial weights and biases (float32)
    sample_bytes: int  # the built-in samples and labels (0 when the program reads them)

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.weight_bytes + self.sample_bytes

    def describe(self) -> str:
        """``code C, weights W, built-in samples S``."""
        return (
            f"code {self.code_bytes:,}, weights {self.weight_bytes:,}, built-in samples "
            f"{self.sample_bytes:,}"
        )


def flash_estimate(parameters: int, layer_count: int, built_in_sample_bytes: int) -> FlashEstimate:
    """What the exported example needs in flash on a Cortex-M4.

    Args:
        parameters: the model's weights and biases (``export_c(...).parameters``).
        layer_count: the model's runtime layers (``len(export_c(...).layers)``).
        built_in_sample_bytes: the samples built into the program, 4 bytes per input value and
            per label (0 when it reads them, as the exported Makefile's build does).

    Returns:
        :class:`FlashEstimate`; ``export_c(...).flash`` is this for the exported model.

    Example:
        >>> flash_estimate(8_372, 11, 16 * 600 * 4 + 16 * 4).total_bytes  # the HAR example
        158160
    """
    code = CODE_BYTES + LAYER_CODE_BYTES * layer_count
    return FlashEstimate(code, 4 * parameters, built_in_sample_bytes)
