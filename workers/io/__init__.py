"""Bytes in and out of the workers: one storage interface (local folders, S3), the input readers and
row keys, the output writer. Torch-free: the driver imports these too.
"""
