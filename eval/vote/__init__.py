"""The blind pairwise voting app (`make vote`).

::

    db.py       the SQLite store (WAL): voters and invite tokens, pairs, what was served, votes
    pairs.py    building the pairs from the eval_images table; exporting votes to Parquet
    app.py      the Starlette app: voter page, JSON API, opaque image URLs, admin pages; strict
                input (ids, JSON types, body size, nesting) and security headers on every response
    pages.py    the HTML pages; their inline scripts are allowed by hash in the CSP
    display.py  both images of a pair at one size (letterbox or crop), so shape names no model
    server.py   running it with uvicorn (foreground, or in a thread for tests and the demo)
"""
