"""The pure-NumPy reference of Cai et al. (MICCAI 2018): the single source of truth.

Never imports torch. Torch ops, Triton kernels, the bench and the walkthrough are checked
against these functions.
"""
from .am import (branch_logits, branch_losses, cam, classification_loss, dilate_erasure, erase, erase_image,
                 fuse_heatmaps, gap, normalise_live, update_masks)
from .kp import kp_layer_loss, kp_loss, total_loss
from .geometry import Grid, cell_centres, cells_in_box, check_grid, compose, naive_grid, nearest_cells, resize, to_cells
from .boxes import DEFAULT_BOX_THRESHOLDS, boxes_from_heatmap, iobb, iou
from .metric import (DEFAULT_AFP_BOUNDS, DEFAULT_IOU_THRESHOLDS, acc_afp_table, auroc, best_overlap,
                     format_acc_afp, localization_accuracy, max_box_acc_v2)
