"""Fake-data benchmark: the ImageNet ResNet-50 ReSA step on random images.

Command:
    python experiments/bench_step.py --config=configs/fake_data_benchmark.py \
        [--steps=20] [--warmup=3] [--write] [--config.batch_size=128 ...]

Hardware: written for one accelerator with >= 40 GB of memory (an A100/H100 GPU
or a TPU v4/v5 chip); `--config.batch_size` scales it down (or up over more
devices, the batch is global).  On a CPU it runs, slowly: use it there only with
small overrides (e.g. --config.arch=resnet18 --config.width_per_group=8
--config.crops_size='(32,)' --config.batch_size=8).

What it measures: bench_step.py times the jit-compiled ReSA train step of this
config (ResNet-50, ImageNet stem, projector 2048-2048-512 and predictor, two
224x224 views, global batch 256, bfloat16 compute, SGD with the authors' ImageNet
values) on random device-resident views, so only the step is timed, not the input
pipeline.  It reports compile time, median/mean step time, images/s (images =
the batch, not batch x views), peak memory and the cost of the step's parts; see
experiments/RESULTS.md ("Train step throughput").  The authors report about
25.2 GB of GPU memory for this setting on one V100 (fp16).

dataset='fake' keeps the config runnable by the training loop as well
(`python -m resa_jax.main --config=configs/fake_data_benchmark.py --workdir=...`),
which then also exercises the input pipeline; labels are random, so kNN is off.
"""

from resa_jax.configs import default


def get_config():
  config = default.get_config()  # the ImageNet ResNet-50 recipe, 224 px, bfloat16
  config.dataset = 'fake'  # 224 px, 1000 classes (the supervised baseline's classifier)
  config.knn_every_epochs = 0  # random labels: nothing to evaluate
  config.log_every_steps = 10
  return config
