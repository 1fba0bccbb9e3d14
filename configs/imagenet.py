"""ImageNet-1k, the authors' ResNet-50 recipe (two 224 px views, predictor, bfloat16).

Command:
    python -m resa_jax.main --config=configs/imagenet.py --workdir=DIR \
        [--config.batch_size=1024 --config.warmup_epochs=10] [--config.num_epochs=200]

Batch 1024 (the authors' large-batch variant): `--config.batch_size=1024
--config.warmup_epochs=10`; lr scales as 0.5 x batch/256 automatically.  800 epochs:
`--config.num_epochs=800 --config.base_lr=0.4`.

Hardware: 8 GPUs/TPU chips or more (the batch is global).  Data: TFDS `imagenet2012`,
prepared from the manual download (ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in <data_dir>/downloads/manual).
Expected accuracy (the AUTHORS' published numbers for their released checkpoints,
not measured by us): 100 epochs, batch 256: linear 71.9 / kNN 64.6; 200 epochs,
batch 256: 73.4 / 67.1; 200 epochs, batch 1024: 73.8 / 67.6; 800 epochs, batch
1024: 75.2 / 69.9.  Runtime: not yet measured by us (see experiments/RESULTS.md for
the step throughput).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'imagenet2012'
  config.eval_split = 'validation'
  config.crops_nmb = (2,)
  config.crops_size = (224,)
  config.crops_min_scale = (0.2,)
  config.crops_max_scale = (1.0,)
  config.gaussian_prob = (0.5,)
  config.solarization_prob = (0.2,)

  config.arch = 'resnet50'
  config.width_per_group = 64
  config.stem = 'imagenet'
  config.zero_init_residual = True
  config.predictor = True
  config.dtype = 'bfloat16'

  config.base_lr = 0.5
  config.weight_decay = 1e-5
  config.warmup_epochs = 2.0
  config.num_epochs = 100.0
  config.batch_size = 256
  config.knn_every_epochs = 10
  config.knn_max_train_examples = 100_000  # periodic kNN on a subset; evaluate.py does all
  config.checkpoint_every_steps = 2500
  return config
