"""The graph delegate's compiler: op rules, lowering, partitioning."""
