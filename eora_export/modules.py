"""Transitional alias: ``EoraLinear`` lives in :mod:`eora_export.eora_linear`.

Kept only until pipeline/streaming/outputs/compensate and their tests import
``eora_export.eora_linear`` directly; delete it then.
"""

from .eora_linear import EoraLinear

__all__ = ["EoraLinear"]
