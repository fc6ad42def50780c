"""The label worker: the actor and its torch-free front, decode, the decode-to-batches pipeline,
inference, the compile cache.
"""
