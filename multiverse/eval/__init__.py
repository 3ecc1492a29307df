"""Evaluation: what a model is measured on and how (SPEC section 2).

  - :mod:`.tasks`: synthetic MapReduce task families with Multiverse reference chains.
  - :mod:`.datasets`: the real benchmarks (AIME, MATH-500, GPQA, a JSONL/Parquet file).
  - :mod:`.grading`: answer extraction and equivalence (math-verify, letters, exact).
  - :mod:`.evaluate`: accuracy, # parallel, trigger rate and wall-clock speedup of one run.
  - :mod:`.structure`: branch trees, validation reports and statistics of Multiverse text.
  - :mod:`.traces`: grading the released Multiverse-32B's stored outputs.
"""
