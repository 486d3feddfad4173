"""TFDS builder package for consep (the folder is what TFDS inspects)."""
