"""dsalign.kernels."""
