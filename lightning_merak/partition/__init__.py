"""Automatic partitioning: legal cut points on the proxy graph, balanced stages, the printable plan."""

from lightning_merak.partition.plan import PartitionError, PartitionPlan, StagePlan, Tie, plan_model

__all__ = ["PartitionError", "PartitionPlan", "StagePlan", "Tie", "plan_model"]
