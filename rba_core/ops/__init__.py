"""Operations on a run (:class:`rba_core.ops.run.Run`, resolved once at the edge): analyze, approximate, export, search, table, the model's own head, healing and lm-eval tasks."""
