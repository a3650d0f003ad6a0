"""Where users already work: shareable tuned compressors (:mod:`.tuned`) and an lmms-eval model
(:mod:`.lmms_eval`, with the optional extra ``pip install sparsezip_pl[lmms-eval]``).

Nothing here is imported by ``import sparsezip_pl``; the lmms-eval entry point
(:mod:`.lmms_eval_plugin`) imports nothing heavy.
"""
