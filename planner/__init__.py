"""`shardwright plan`: predict per-rank memory and step time of parallel layouts and rank them (docs/plan.md)."""
