"""Step-by-step float64 references for the ssm_ext ops.

Written from SPEC.md (and the per-family API notes) with explicit loops; they share
no code with the kernels and are used as ground truth by the tests.
"""
