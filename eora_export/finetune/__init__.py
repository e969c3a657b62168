"""``eora-export finetune``: train the low-rank factors of an export on a frozen compressed base.

- :mod:`.train`: the training itself, on tensors and modules (inits, AdamW on A and B, re-quantization);
- :mod:`.folders`: reading the adapter and base folders, writing the fine-tuned output;
- :mod:`.job`: the order of steps (prepare → train → evaluate → compare inits → report).

The command's flags are :mod:`eora_export.cli.finetune`.
"""
