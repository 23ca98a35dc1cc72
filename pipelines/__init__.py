"""dsalign.pipelines."""
