"""The pieces of ``examples/tiny_llava/train_tiny_llava.py`` (the script holds the options and
the order of the stages; its docstring describes the curriculum).

- ``common``: the model it builds (llava-hf layout), the learning-rate schedule, logging, saving.
- ``vision_stage``: stage 1, the CLIP tower learns to see from dense per-patch and CLS labels.
- ``language_data``: stage 2's items per image (yes/no pairs, counts, captions, conversations),
  packed into rows, and the labels the auxiliary losses read.
- ``auxiliary_losses``: where the answer position looks (grounding, counting) and what its hidden
  state carries (routing, readout, keep probes).
- ``language_stage``: stage 2, projector + LLM trained on the frozen tower.
- ``card``: the model card, every figure from the run's own results.
"""
