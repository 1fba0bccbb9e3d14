"""ImageNet-1k, the authors' ViT recipe on ViTC-S/16 (MoCo v3's conv stem, 11 blocks).

Command:
    python -m resa_jax.main --config=configs/imagenet_vitc_small.py --workdir=DIR

Hardware, data, runtime: as configs/imagenet_vit_small.py (8+ GPUs/TPU chips, global
batch 1024; not yet measured by us).

The recipe is configs/imagenet_vit_small.py's (their ViT defaults: AdamW, lr 5e-4 x
batch/256, wd 0.1, warm-up 40 epochs, cosine to 0.001 x lr, 300 epochs); only the
encoder differs: `--arch vitc_small` (src/vision_transformer.py: four Conv3x3/2-BN-ReLU
stages and a 1x1 conv instead of the 16x16 patch conv; the stem trains, only the
position table is frozen).  They publish no ViTC training script, so the command is the
ViT-S one with the architecture swapped:
    torchrun --nproc_per_node=4 main.py --arch vitc_small --epochs 300 --batch_size 256
Their ViT forward (methods/base.py `ForwardWrapper`) runs the
views of one resolution through the encoder as one batch, so the stem's BatchNorm
statistics are over both 224 px views together; ours are per view.

Expected accuracy (the AUTHORS' numbers for their released ViTC-S/16 checkpoint,
docs/method.md, 'Published numbers'): linear 75.1% / kNN 72.3% top-1; not measured by
us.
"""

from resa_jax.configs import imagenet_vit_small


def get_config():
  config = imagenet_vit_small.get_config()
  config.arch = 'vitc_small'
  return config
