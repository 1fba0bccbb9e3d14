"""The authors' PyTorch checkpoints -> Flax variables (and a converted checkpoint folder).

    python -m resa_jax.convert --checkpoint=resa_800ep.pth --out=DIR

Which file holds what, from the bottom up (each imports only those above it):

  state_dict.py    reading .pth files; the key and layout mapping; `convert_state_dict`
                   (full checkpoints), `convert_encoder` (encoder-only files)
  architecture.py  the model fields a state dict's shapes fix (`infer_fields`), and the
                   one-line refusal of a flag that disagrees (`choose_fields`)
  files.py         `convert_file` (.pth -> folder), `save_converted`, `load_converted`,
                   `read_metadata`
  __main__.py      the flags

PyTorch is needed only to read .pth files (``pip install 'resa_jax[torch]'``).
"""

from resa_jax.convert.architecture import choose_fields
from resa_jax.convert.architecture import infer_fields
from resa_jax.convert.files import check_output_dir
from resa_jax.convert.files import convert_file
from resa_jax.convert.files import load_converted
from resa_jax.convert.files import METADATA_FILE
from resa_jax.convert.files import read_metadata
from resa_jax.convert.files import save_converted
from resa_jax.convert.state_dict import check_finite
from resa_jax.convert.state_dict import ConversionError
from resa_jax.convert.state_dict import convert_encoder
from resa_jax.convert.state_dict import convert_state_dict
from resa_jax.convert.state_dict import convert_subnet
from resa_jax.convert.state_dict import encoder_state_dict
from resa_jax.convert.state_dict import load_torch_state_dict
from resa_jax.convert.state_dict import MOMENTUM_ENCODER_PREFIX
from resa_jax.convert.state_dict import split_subnets
from resa_jax.convert.state_dict import SUBNETS

__all__ = ['check_finite', 'check_output_dir', 'choose_fields', 'ConversionError',
           'convert_encoder', 'convert_file', 'convert_state_dict', 'convert_subnet',
           'encoder_state_dict', 'infer_fields', 'load_converted', 'load_torch_state_dict',
           'METADATA_FILE', 'MOMENTUM_ENCODER_PREFIX', 'read_metadata', 'save_converted',
           'split_subnets', 'SUBNETS']
