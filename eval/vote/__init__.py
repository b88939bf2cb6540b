"""The blind pairwise voting app (`make vote`).

::

    db.py       the SQLite store (WAL): voters and invite tokens, pairs, what was served, votes
    pairs.py    building the pairs from the eval_images table; exporting votes to Parquet
    app.py      the Starlette app: voter page, JSON API, opaque image URLs, admin page
    server.py   running it with uvicorn (foreground, or in a thread for tests and the demo)
"""
