"""CIFAR-10 (JPEG snapshot) on a 2-core CPU: the authors' CIFAR-10 recipe
(configs/cifar10_jpeg.py), scaled down to about 2 hours of training.

Command (in parts: rerunning it resumes; run_steps bounds one part):
    nice -n 19 python -m resa_jax.main --config=configs/cifar10_jpeg_cpu.py \
        --workdir=DIR [--config.run_steps=N]

Changes from the authors' recipe, all for 2 CPU cores (everything else is theirs:
ResNet-18 with their CIFAR stem, weak + strong 32 px views, projector 2048-2048-512,
no predictor, tau 0.4, epsilon 0.05, 3 Sinkhorn iterations, SGD lr 0.3 x batch/256,
weight decay 1e-4, cosine to 0.1 x lr, float32):

* `width_per_group` 16 instead of 64 (a 128-d encoding instead of 512-d; about 1/16
  of the convolution FLOPs);
* 4.5 epochs instead of 1000;
* batch 128 instead of 256 with lr 0.6 x batch/256 instead of 0.3 x batch/256, and 0.5
  warm-up epochs instead of 2;
* EMA momentum starts at 0.99 instead of 0.996 (its cosine still ends at 1), for a run
  of ~1,750 steps rather than ~195,000;
* kNN (weighted and the authors' 5-NN) every 2 epochs (and at the end) instead of every 5.

Runtime and accuracy (ours, a 2-core AMD EPYC, experiments/RESULTS.md "CIFAR-10 (JPEG
snapshot), 2-core CPU"): 2 h 11 min of training at about 30 images/s; after 4.5 epochs
weighted kNN top-1 44.11% (random encoder 32.97%, raw pixels 45.65%), the authors' 5-NN
40.92% (26.81%, 34.04%); linear probe (`--eval=linear`) best 46.23%.
"""

from resa_jax.configs import cifar10_jpeg


def get_config():
  config = cifar10_jpeg.get_config()
  config.width_per_group = 16
  config.num_epochs = 4.5
  config.batch_size = 128
  config.base_lr = 0.6
  config.warmup_epochs = 0.5
  config.ema_momentum = 0.99
  config.knn_every_epochs = 2
  config.log_every_steps = 20
  config.checkpoint_every_steps = 100
  return config
