"""dsalign.model."""
