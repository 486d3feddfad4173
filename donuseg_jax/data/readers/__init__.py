"""Raw dataset readers: one module per dataset, each with `list_ids(root)` and `iter_examples(root)`.

Every reader yields whole-image examples (see `donuseg_jax.data.batch`): image (H, W, 3) uint8,
instances (H, W) int32 with ids 1..K, points (K, 2) float32 at the instance centroids, id, group.
The TFDS builders (`donuseg_jax.data.builders`) are the only other users of these modules.
"""
