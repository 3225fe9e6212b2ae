"""Ahead-of-time side: partitioner, preprocess (packing + routing) and the blob schema."""
