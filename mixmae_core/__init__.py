"""MixMAE (Mixed and Masked Autoencoder) in plain PyTorch + timm.

Importing the package registers the encoders with timm, so
``timm.create_model("mixmae_swin_base_w14", num_classes=1000)`` builds the classifier and
``mixmae_core.create_model("mixmae_swin_base_w14")`` the pretraining model.
No Ray or MLflow here: the pipelines package adds those.
"""

from mixmae_core.encoders import MixMAESwin, available_encoders
from mixmae_core.masking import MaskSpec, PretrainOutput, sample_mask
from mixmae_core.mixmae import MixMAE, create_model

__all__ = ["MaskSpec", "MixMAE", "MixMAESwin", "PretrainOutput", "available_encoders", "create_model", "sample_mask"]
__version__ = "0.1.0"
