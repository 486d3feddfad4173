"""Default DoNuSeg configuration: every field, one line each.

Dataset configs (`configs/tnbc.py`, ...) import this file and override what differs. Every config
accepts a variant after a colon:

  python -m donuseg_jax.main --config=configs/tnbc.py          # paper settings (a GPU job)
  python -m donuseg_jax.main --config=configs/tnbc.py:lite     # CPU experiment, about half an hour
  python -m donuseg_jax.main --config=configs/tnbc.py:smoke    # tiny, for tests

Override any field with `--config.section.field=value`; the config is locked, so a mistyped field
name is an error.
"""

import ml_collections

SIZES = ('lite', 'cpu', 'smoke')
VARIANTS = SIZES + ('plus',)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Paper defaults (section 3.2 and `shared/DESIGN.md`), on the built-in synthetic data."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # model initialisation and training randomness (fold_in(key, step))

  config.data = data = ml_collections.ConfigDict()
  data.name = 'synthetic'  # tnbc | consep | monuseg | cryonuseg | synthetic | folder
  data.folder = ''  # folder dataset only: your images with point files (configs/folder.py)
  data.data_root = ''  # raw datasets; '' = $DONUSEG_DATA_ROOT, else ../shared/data beside the checkout
  data.tfds_dir = ''  # prepared TFDS array_record files; '' = $DONUSEG_TFDS_DIR, else ~/.cache/donuseg_jax/tfds
  data.fold = 0  # 5-fold CV: test = fold, val = fold + 1 (mod 5), train = the other three
  data.split_scheme = 'cv5'  # cv5 | official (MoNuSeg only: official train, held-out official test)
  data.seed = 0  # data order and augmentation randomness, separate from the model seed
  data.crop_size = 256  # training crop side (pixels)
  data.batch_size = 8  # global batch, split across devices
  data.max_points = 256  # points/boxes per crop are padded to this (static shapes); extra ones dropped
  data.color_jitter = 'hed'  # none | hed (H&E stain jitter in HED space) | rgb
  data.synthetic_images = 40  # number of synthetic images (synthetic dataset only)
  data.synthetic_size = 512  # side of each synthetic image (synthetic dataset only)

  config.labels = labels = ml_collections.ConfigDict()
  labels.initial = 'disks'  # initial label M: disks (paper: r / d below) | watershed (image-aware, plus)
  labels.watershed_cap = 20.0  # watershed M: a region stays within this distance of its point
  labels.watershed_sigma = 1.0  # watershed M: Gaussian smoothing of the hematoxylin density
  labels.watershed_band = 3  # watershed M: ignored ring (pixels) around each region; 0 beyond
  labels.r = 4.0  # initial label M: foreground where distance to the nearest point <= r
  labels.d = 20.0  # initial label M: background where distance > d; ignored in between
  labels.box_ratio = 1.0  # pseudo boxes: d_i = ratio * mean distance to the 2 nearest neighbours
  labels.box_range_split = 10  # pseudo boxes: local radius R = (max_y - min_y) / range_split
  labels.box_min = 6.0  # pseudo boxes: smallest side (pixels)
  labels.box_max = 40.0  # pseudo boxes: largest side (pixels)

  config.model = model = ml_collections.ConfigDict()
  model.encoder = 'resnet50'  # resnet50 | resnet34 | resnet18 | tiny (tiny: for tests only)
  model.fpn_channels = 256  # FPN width
  model.head_channels = 256  # detection / segmentation tower width
  model.head_convs = 4  # convs per detection / segmentation tower
  model.seg_stride = 2  # stride of the segmentation fusion (2 = P1 as in [code]; 4 = from P2, cheaper)
  model.projector_level = 'c5'  # encoder feature fed to the CCL projector g: c2 | c3 | c4 | c5 | p5
  model.projection_dim = 128  # channels of Z
  model.loc_hidden = 512  # width of the localization head's per-location layers
  model.dtype = 'float32'  # compute dtype: float32 | bfloat16 (parameters stay float32)
  model.pretrained = ''  # converted ImageNet ResNet weights (.npz from donuseg_jax.models.convert); '' = scratch
  model.init_from = ''  # fine-tune: a trained run's work dir; its best checkpoint's weights start training
  model.init_encoder_only = False  # with init_from: take only the encoder (and its BatchNorm statistics)

  config.loss = loss = ml_collections.ConfigDict()
  loss.use_det = True  # L_det (FCOS)
  loss.use_seg = True  # L_seg (Eq. 1)
  loss.use_loc = True  # L_loc (MSE)
  loss.use_dcs = True  # L_dcs (Eq. 5), Table 2
  loss.use_ccl = True  # L_ccl (Eq. 6-7), Table 2
  loss.w_dcs = 0.5  # omega_1
  loss.w_ccl = 2.0  # omega_2
  loss.seg_balance = 'pooled'  # pooled (paper Eq. 1) | balanced ([code]: fg and bg means summed)
  loss.theta = 0.8  # CAM binarisation threshold (Eq. 3)
  loss.alpha = 'balanced'  # similarity rate (Eq. 4): balanced (mean of fg and bg agreement) | paper
  loss.cam_statistics = 'running'  # CAM pass BatchNorm: running | batch (cancels blocks 1-3; issue 9)
  loss.pseudo_background = 'cam'  # P = 0 counted in L_dcs / L_ccl: cam (paper: everywhere) | m (only where M = 0)
  loss.tau = 1.0  # contrastive temperature (Eq. 7)
  loss.fixed_cam_block = 0  # 0 = dynamic selection (DCS); 1..4 = always use that block (Table 3)
  loss.cam_warmup_epochs = 0  # epochs before L_dcs / L_ccl switch on ([code] used a warm-up; paper 0)
  loss.cam_warmup_fraction = 0.0  # or this share of the training steps, if longer (0 = off)
  loss.contrastive_keys = 'features'  # features (paper) | minus_anchor ([code]: u - q)
  loss.focal_alpha = 0.25  # FCOS focal loss alpha
  loss.focal_gamma = 2.0  # FCOS focal loss gamma

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 0.01  # SGD (paper)
  optim.momentum = 0.9  # SGD momentum (paper)
  optim.weight_decay = 5e-4  # L2 weight decay (paper)
  optim.schedule = 'cosine'  # constant | cosine | poly (not in the paper: our documented choice)
  optim.warmup_steps = 100  # linear LR warm-up steps (keeps early FCOS training stable from scratch)
  optim.grad_clip = 10.0  # global-norm gradient clipping (0 = off)

  config.train = train = ml_collections.ConfigDict()
  train.epochs = 40  # training epochs (paper); one epoch = every training image's area seen once
  train.log_every = 10  # steps between metrics.jsonl lines
  train.eval_every_epochs = 5  # validation AJI every this many epochs (and at the end)
  train.checkpoint_every_steps = 200  # steps between checkpoints (also at each evaluation)
  train.keep_checkpoints = 3  # latest checkpoints kept (the best by validation AJI is kept too)
  train.ema_decay = 0.0  # moving average of the weights: validated, selected, used (0 = off, paper)
  train.select_metric = 'point_f1'  # best checkpoint by this val metric: point_f1 (points only) | aji | ...
  # A later checkpoint replaces the best if its score is within this many standard errors (of the
  # per-image validation scores at the highest score) of the highest score: 0 = strictly the best.
  train.select_within_sem = 0.0
  train.max_steps = 0  # stop after this many steps (0 = epochs decide); for tests and benchmarks

  config.eval = ev = ml_collections.ConfigDict()
  ev.windows = 'throughput'  # throughput (max_window/margin, fitted to small images) | fixed (window/stride)
  ev.max_window = 1024  # throughput: largest window side (a multiple of 64)
  ev.margin = 32  # throughput: context margin on each window side (stride = window - 2 * margin)
  ev.blend = 'ramp'  # throughput: ramp (cropped edges, linear blend) | crop | hann
  ev.window = 256  # fixed: sliding-window side
  ev.stride = 128  # fixed: sliding-window stride
  ev.batch_size = 8  # fixed: windows per device call (throughput: the same pixels per call)
  ev.instance_method = 'boxes'  # boxes ([code] assembly) | cells (boxes bounded by watershed cells) | watershed
  ev.grow_px = 0.0  # boxes: flood unclaimed foreground up to this far from the instances (0 = [code])
  ev.unclaimed_min_px = 0  # boxes: unclaimed foreground blobs of >= this many pixels kept (0 = [code]: dropped)
  ev.flip_tta = False  # segmentation logits averaged over the 4 flips of each window (4x network)
  ev.score_threshold = 0.5  # keep detections with class probability above this
  ev.nms_iou = 0.44  # global NMS IoU threshold
  ev.max_detections = 1000  # per window, before NMS
  ev.protocol = 'image'  # image (stitched whole images) | patch (256/stride-128 crops, as [code])
  ev.max_images = 0  # evaluate at most this many images (0 = all)
  ev.write_overlays = 4  # overlay PNGs written after training (0 = none)

  return apply_variant(config, variant)


def apply_variant(config: ml_collections.ConfigDict, variant: str | None) -> ml_collections.ConfigDict:
  """Applies comma-separated variants: a size (`lite`, `cpu`, `smoke`) and/or `plus`.

  `cpu`: the most accuracy per CPU-hour (measured, README), training and test evaluation within an
  hour on 2 cores. `plus`: what measured better than the paper's letter: the image-aware initial
  label, and L_dcs without L_ccl (the Table 2 runs at CPU scale, README); combine as
  `configs/tnbc.py:cpu,plus` (or `:plus` alone at paper scale).
  """
  names = [name for name in (variant or '').split(',') if name]
  unknown = [name for name in names if name not in VARIANTS]
  sizes = [name for name in names if name in SIZES]
  if unknown or len(sizes) > 1:
    raise ValueError(f'unknown or conflicting config variant {variant!r}; expected at most one of '
                     f'{SIZES} and optionally plus, comma-separated (e.g. cpu,plus)')
  variant = sizes[0] if sizes else ''
  if 'plus' in names:
    config.labels.initial = 'watershed'
    # With P foreground on ~0.3% of pixels, L_ccl's background keys hold most nucleus pixels; on
    # TNBC fold 0 (cpu) it lowered validation point F1 and test AJI (README, Table 2 rows).
    config.loss.use_ccl = False
  if variant == 'cpu':
    config.model.encoder = 'resnet18'
    config.model.fpn_channels = 128
    config.model.head_channels = 128
    config.model.head_convs = 4
    config.model.seg_stride = 4
    config.model.loc_hidden = 256
    config.model.projection_dim = 64
    config.train.epochs = 30
    config.train.max_steps = 450  # the hour's budget on 2 cores (~6 s a step) whatever the dataset
    config.train.eval_every_epochs = 5
    config.train.log_every = 5
    config.optim.warmup_steps = 20
  elif variant == 'lite':
    config.model.encoder = 'resnet18'
    config.model.fpn_channels = 128
    config.model.head_channels = 128
    config.model.seg_stride = 4
    config.model.loc_hidden = 256
    config.model.projection_dim = 64
    config.train.epochs = 10
    config.train.eval_every_epochs = 5
    config.train.log_every = 5
    config.optim.warmup_steps = 20
  elif variant == 'smoke':
    config.model.encoder = 'tiny'
    config.model.fpn_channels = 16
    config.model.head_channels = 16
    config.model.head_convs = 1
    config.model.seg_stride = 4
    config.model.loc_hidden = 16
    config.model.projection_dim = 8
    config.data.batch_size = 4
    config.data.crop_size = 64
    config.data.max_points = 64
    config.data.synthetic_images = 10
    config.data.synthetic_size = 128
    config.train.epochs = 1
    config.train.max_steps = 4
    config.train.log_every = 1
    config.train.eval_every_epochs = 1
    config.train.checkpoint_every_steps = 2
    config.optim.warmup_steps = 0
    config.optim.schedule = 'constant'  # step count out of the compiled program: one cached compile
    config.eval.window = 64
    config.eval.stride = 32
    config.eval.max_window = 128
    config.eval.margin = 16
    config.eval.batch_size = 4
    config.eval.max_images = 2
    config.eval.write_overlays = 1
  config.lock()
  return config
