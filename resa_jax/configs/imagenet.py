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

The recipe is configs/default.py's; this file adds only the bookkeeping of a long run.
"""

from resa_jax.configs import default


def get_config():
  config = default.get_config()
  config.knn_max_train_examples = 100_000  # periodic kNN on a subset; resa_jax.evaluate does all
  config.checkpoint_every_steps = 2500
  return config
