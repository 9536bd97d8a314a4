"""Files on disk: atomic writes, weight files with metadata, recognising bad files."""
