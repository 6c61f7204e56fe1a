"""MixMAE (Mixed and Masked Autoencoder) in plain PyTorch + timm.

Importing the package registers the encoders with timm, so
``timm.create_model("mixmae_swin_base_w14", num_classes=1000)`` builds the classifier.
No Ray or MLflow here: the pipelines package adds those.
"""

from mixmae_core.masking import sample_mask
from mixmae_core.models import VARIANTS, MixMAE, MixMAEOutput, MixMAESwin, create_model, encoder_config

__all__ = ["VARIANTS", "MixMAE", "MixMAEOutput", "MixMAESwin", "create_model", "encoder_config", "sample_mask"]
__version__ = "0.1.0"
