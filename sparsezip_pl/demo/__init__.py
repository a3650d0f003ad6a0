"""The embedded demo (``python -m sparsezip_pl.demo.pipeline``, ``make demo``): tunes and scores
SparseZip on the shipped tiny LLaVA (``checkpoints/tiny-llava-synth``) through the project's own
CLI. How that model was trained, and the lab's own evaluation of it: ``examples/tiny_llava``."""
