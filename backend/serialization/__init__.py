"""The delegate blob: schema.fbs, its generated Python mirror, and blob.py (read/write)."""
