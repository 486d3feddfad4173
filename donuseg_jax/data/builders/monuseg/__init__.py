"""TFDS builder package for monuseg (the folder is what TFDS inspects)."""
