"""TFDS builders, one package folder per dataset (TFDS locates a builder's files by its folder).

They write array_record files without TensorFlow: every feature is a `tfds.features.Tensor`
(zlib-compressed for the image and instance maps) or `tfds.features.Text`, both of which encode
and decode with NumPy alone (`tfds.features.Image` would need TensorFlow). Raw files are read
through `donuseg_jax.data.readers`. Use them through `donuseg_jax.data.datasets.load_examples`,
or directly:

  builder = tnbc_dataset_builder.Builder(data_dir=TFDS_DIR, raw_dir=DATA_ROOT / 'tnbc')
  builder.download_and_prepare()
  source = builder.as_data_source()['train']  # random access, NumPy values, bytes for text
"""
