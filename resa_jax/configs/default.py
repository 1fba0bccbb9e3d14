"""Every field of a ReSA config, set to one coherent recipe: the authors' ImageNet
ResNet-50 recipe (docs/method.md, 'Hyper-parameters'; `configs/imagenet.py` is this
recipe as it is trained).  Every other config imports `get_config()` from here and sets
only the fields where it differs.

Command (the same as configs/imagenet.py):
    python -m resa_jax.main --config=configs/default.py --workdir=DIR
Hardware, runtime, accuracy: see configs/imagenet.py (the authors' published
numbers; not measured by us).

Field groups:

* data: `dataset`, `data_dir`, crop lists (`crops_*`, one entry per crop group),
  augmentation strengths;
* model: `arch`, `width_per_group`, `stem`, projector / predictor sizes, `dtype`;
* ReSA: `temperature`, `sinkhorn_epsilon`, `sinkhorn_iters`, `ema_momentum`;
* optimisation: `optimizer`, `base_lr` (scaled by batch/256), `weight_decay`,
  `warmup_epochs`, `final_lr_ratio`, `num_epochs`, `batch_size` (global);
* bookkeeping: logging, checkpointing and kNN evaluation periods.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---- data ----
  config.dataset = 'imagenet2012'
  config.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir
  config.manual_dir = ml_collections.config_dict.placeholder(str)
  # Let TFDS download and prepare a missing dataset on first use, as tfds.load does
  # (ImageNet: from manual_dir).  False: fail at once with how to prepare it (offline,
  # a download only fails after minutes of retries).  Fashion-MNIST is prepared from
  # the Debian package dataset-fashion-mnist when installed, whatever this says.
  config.tfds_download = True
  config.train_split = 'train'
  config.eval_train_split = 'train'  # kNN memory bank / linear-probe training set
  config.eval_split = 'validation'
  # Crop groups, as the authors' --crops_nmb/--crops_size/--crops_min_scale/
  # --crops_max_scale/--solarization_prob (plus a per-group gaussian_prob).
  # crops_nmb counts the strong views of each group; the weak view (view 0) comes on
  # top at group 0's size and scale, as theirs.  (1,): weak + strong = 2 views.
  config.crops_nmb = (1,)
  config.crops_size = (224,)
  config.crops_min_scale = (0.2,)
  config.crops_max_scale = (1.0,)
  config.gaussian_prob = (0.5,)
  config.solarization_prob = (0.2,)
  config.color_jitter_prob = 0.8
  config.brightness = 0.4
  config.contrast = 0.4
  config.saturation = 0.2
  config.hue = 0.1
  config.grayscale_prob = 0.2
  config.flip_prob = 0.5
  config.eval_resize = 256  # ImageNet-sized eval: resize then centre-crop crops_size[0]
  config.shuffle_buffer = 16_384
  config.prefetch = 2
  # Where the training views are made (resa_jax.data.placement; docs/data.md): 'host'
  # (tf.data on the CPU cores), or 'device': views made on the accelerators, from the
  # train split held there when each device's share of it, decoded, is at most
  # device_memory_budget_mb, else from crops the host makes of the files.  The two draw
  # different views of one seed (JAX's RNG, TensorFlow's) and blur slightly differently
  # (resa_jax/data/views_jax.py).  'auto': 'device' on GPUs and TPUs, else 'host'.
  config.augment_on = 'auto'
  config.device_memory_budget_mb = 4096.0
  # The host placement keeps a split decoded in memory when each process's share is at
  # most this, else streams it from its files.
  config.host_memory_budget_mb = 512.0
  # The readers the host's training stream is cut into: -1, one per process.  The stream
  # is a function of (seed, step, input_shards); set a multiple of every process count
  # a run may resume with (e.g. 8) to keep it when that count changes.
  config.input_shards = -1
  # dataset='fake': random uint8 images (3 channels), no TFDS; for benchmarks/tests.
  config.fake_image_size = 224
  config.fake_num_classes = 1000
  config.fake_num_examples = 10_000  # per split

  # ---- model ----
  config.arch = 'resnet50'
  config.width_per_group = 64
  config.stem = 'imagenet'  # or 'cifar'
  config.zero_init_residual = True
  config.mlp_layers = 3
  config.mlp_dim = 2048
  config.emb_dim = 512
  config.predictor = True
  # ViTs: stochastic depth of the online encoder, rising linearly to this rate over the
  # blocks (the authors' --drop_path); the momentum encoder never drops (as DINO's teacher).
  config.drop_path = 0.0
  config.patch_size = 16  # plain ViTs (theirs: 16); smaller for 28-32 px images
  config.dtype = 'bfloat16'  # compute dtype; parameters, losses and Sinkhorn stay float32

  # ---- ReSA ----
  config.temperature = 0.4
  config.sinkhorn_epsilon = 0.05
  config.sinkhorn_iters = 3
  config.ema_momentum = 0.996  # cosine schedule from this value to 1.0

  # ---- optimisation ----
  config.optimizer = 'sgd'  # or 'adamw'
  config.base_lr = 0.5  # lr = base_lr * batch_size / 256
  config.weight_decay = 1e-5
  config.sgd_momentum = 0.9
  config.warmup_epochs = 2.0
  config.final_lr_ratio = 0.1  # cosine decays to final_lr_ratio * lr
  config.num_epochs = 100.0
  config.batch_size = 256  # global, over all devices and hosts
  config.grad_clip = ml_collections.config_dict.placeholder(float)

  # ---- bookkeeping ----
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.knn_every_epochs = 10
  config.knn_k = 20
  config.knn_temperature = 0.07
  config.knn_max_train_examples = -1  # -1: the whole eval_train_split
  config.steps_per_epoch = -1  # -1: derived from the dataset size
  config.num_train_steps = -1  # -1: num_epochs * steps_per_epoch
  # Stop (with a checkpoint) after this many steps of this invocation; rerunning the
  # same command resumes.  -1: run to the end.  For long runs done in parts.
  config.run_steps = -1
  # Resuming a workdir with a config that differs from its config.json in a field
  # that changes the training (see resa_jax/workdir.py TRAINING_NEUTRAL_FIELDS for the
  # fields that may differ) is refused unless True; then the change is recorded in
  # config_history.json and config.json keeps the original.
  config.allow_config_change = False
  return config
