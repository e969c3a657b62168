"""Default settings shared by more than one configuration, each defined once.

:class:`eora_export.config.RunConfig` (and through it the CLI), :class:`eora_export.compress.CompressConfig`
and the compensation settings read them from here, so a default changes in one place.
"""

QUANT = "rtn"  # weight quantizer
BITS = 4  # weight bits
GROUP_SIZE = 128  # quantization group along the input dim
SPARSITY = "none"  # 2:4 sparsifier
METHOD = "eora"  # compensation
RANK = 16  # rank of the low-rank residual
LOWRANK_BITS = 4  # storage of the factors
LOWRANK_QUANT = "gptq"  # how the factors are rounded: in the fitted activation metric, or to nearest
LOWRANK_GROUP_SIZE = 0  # 0: the largest of 128…2 dividing rank and width
