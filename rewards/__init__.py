"""dsalign.rewards."""
