"""TFDS builder package for tnbc (the folder is what TFDS inspects)."""
