"""dsalign.alignment."""
