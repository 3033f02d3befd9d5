"""Result stores: blobs of results too large to keep inline, apart from the queue.

``base.py`` is the contract (``ResultStore``, ``ResultWriter``, ``Area``); ``memory.py``,
``files.py`` and ``s3.py`` implement it. ``arqd/stores.py`` picks one by config name and imports
only that one, so optional drivers (aioboto3 for ``s3``) are needed only by those who use them.
A store imports the model, errors and clock, and (for S3) the AWS toolkit
``arqd/backends/aws.py``; never the core, and never a queue backend.
"""
