"""The blind pairwise voting app (`make vote`).

::

    db.py       the SQLite store (WAL): voters and invite tokens, pairs, what was served, votes
    pairs.py    building the pairs from the eval_images table; exporting votes to Parquet
    app.py      the Starlette app: voter page, JSON API, opaque image URLs, admin pages; strict
                input (ids, JSON types and media type, body size, nesting), 410 for bad images,
                and security headers on every response
    pages.py    the HTML pages; their inline scripts are allowed by hash in the CSP
    display.py  every served image re-encoded: one JPEG at the study size, no metadata (pixels only)
    render_cache.py  rendered images cached write-once (unique temp names, one render per image)
    server.py   running it with uvicorn (foreground, or in a thread for tests and the demo)
"""
