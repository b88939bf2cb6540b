"""Sample data, a local HTTP server and tiny random models for tests and `make demo`.

Nothing here downloads anything: photographs come from scikit-image's bundled data
files, everything else is generated.
"""
