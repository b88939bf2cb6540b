"""Curation: download web image-text pairs (img2dataset) and filter them (Ray Data)."""
