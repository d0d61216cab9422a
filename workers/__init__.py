"""cosy workers: one process per GPU (or CPU), one warm engine, audio published as it is made."""
