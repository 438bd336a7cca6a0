"""ELoFTR variant: config, preprocessing, the PyTorch network (export graphs), pipeline, post-processing."""
