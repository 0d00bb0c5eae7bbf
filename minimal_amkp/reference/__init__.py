"""The pure-NumPy reference of Cai et al. (MICCAI 2018): the single source of truth.

Never imports torch. Torch ops, Triton kernels, the bench and the walkthrough are checked
against these functions.
"""
from .am import (branch_logits, branch_losses, cam, classification_loss, erase,
                 fuse_heatmaps, gap, update_masks)
from .kp import kp_layer_loss, kp_loss, total_loss
