"""ImageNet-1k, ViT-S/16 with the authors' multi-crop: weak 224 + strong 224 + six 96 px.

Command:
    python -m resa_jax.main --config=configs/imagenet_vit_small_multicrop.py --workdir=DIR

Hardware: 8+ GPUs/TPU chips (global batch 1024; the authors ran 8 GPUs x 128); the six
96 px crops enter the online branch only.  Data as configs/imagenet.py; runtime not yet
measured by us.

The authors' command this is (winci-ai/resa scripts/train/vits16_multicrop.sh):
    torchrun --nproc_per_node=8 main.py --arch vit_small --patch_size 16 --crops_nmb 1 6
        --crops_size 224 96 --crops_min_scale 0.2 0.05 --crops_max_scale 1.0 0.2
        --solarization_prob 0.2 0 --epochs 300 --batch_size 128
with the ViT defaults of configs/imagenet_vit_small.py.  Gaussian blur stays at p 0.5
in both groups (their ImageNetTransform default).  The 96 px crops use the position table resized as theirs (vit.interpolate_pos_embed).

Expected accuracy: the authors publish no number for this variant; not measured by us.
"""

from resa_jax.configs import imagenet_vit_small


def get_config():
  config = imagenet_vit_small.get_config()
  config.crops_nmb = (1, 6)
  config.crops_size = (224, 96)
  config.crops_min_scale = (0.2, 0.05)
  config.crops_max_scale = (1.0, 0.2)
  config.gaussian_prob = (0.5, 0.5)
  config.solarization_prob = (0.2, 0.0)
  return config
