"""Pipeline parallelism at run time: stages (``stage``), torch-runtime handlers (``runtime``), the step
takeover (``takeover``) and the engines the strategy delegates steps to (``engine``). Planning — schedules,
simulation, recompute ratios, the automatic choice — is pure and lives in ``lightning_merak.pipeline.plan``.
"""
