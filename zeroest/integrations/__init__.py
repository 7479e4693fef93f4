"""The user's own job as a validation run.

* ``zeroest.watch(engine)`` (``zeroest/watch.py``): a context manager around the first steps of a custom loop;
* ``zeroest.integrations.hf.ZeroestCallback``: the same for the HF Trainer (imports transformers);
* ``engine``: the ``TrainingSetup`` of a live DeepSpeed engine; ``compare``: measured against predicted, the
  warnings and the runs.jsonl rows.

Nothing here is imported by ``import zeroest``; torch and deepspeed are imported only by the functions that read a
live job.
"""
