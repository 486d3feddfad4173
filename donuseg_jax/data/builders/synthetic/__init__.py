"""TFDS builder package for synthetic (the folder is what TFDS inspects)."""
