"""TFDS builder package for cryonuseg (the folder is what TFDS inspects)."""
