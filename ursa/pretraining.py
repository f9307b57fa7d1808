"""The toy's stand-in for pretrained components: what its vision tower learns to see before the recipe.

A real URSA starts from a pretrained SigLIP / SAM-B and a pretrained Qwen2.5-Math; the toy trains its
own in `train.py pretrain`, and this module gives that stage its vision targets and heads:

    attributes(facts)        the scene's facts as NUM_ATTR_SLOTS small ints (one classifier each)
    patch_attributes(facts)  the facts of the object in each of the 4 x 4 image patches
    AttributeHeads           linear heads predicting both from the vision tower's patch features

Every value is < NUM_ATTR_VALUES.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ursa.world import BAR_COLOURS, BAR_PITCH, BAR_W, BAR_X0, FAMILIES, KINDS, MAX_SHAPES, SHAPE_COLOURS, shape_counts

# Scene attributes for "vision pretraining" (one classifier per slot), the same layout length for
# every family; slot 0 is the family id.
#   shapes: 1-9  count of (colour, kind) for colour in SHAPE_COLOURS for kind in KINDS
#   bars:   1-4  bar heights left to right (0 = no bar), 5-8 colour id + 1 (0 = no bar)
#   grid:   1 width, 2 height, 3 cut width, 4 cut height (0 = no cut), 5 x0, 6 y0, 7 corner id + 1
NUM_ATTR_SLOTS = 10
NUM_ATTR_VALUES = MAX_SHAPES + 1

# Patch attributes: the same facts per image patch (a 4x4 grid of 12-px cells = the tiny ViT's
# patches, row-major), so that every patch token learns to carry the facts of ITS object, which the
# language model then reads by attending to the right patch. Slot 0 is the family id.
#   shapes: 1 the cell's shape (0 empty, 1 + 3 * colour + kind), 2 how many shapes of that colour
#           and kind the image has, 3 how many of that kind (any colour), 4 how many shapes in all
#   bars:   1 the colour id + 1 of the bar in the patch's column (0: none), 2 its height,
#           3 its height rank (1 = tallest), 4 the number of bars
#   grid:   1 width, 2 height, 3 cut width, 4 cut height (0 = no cut), in every patch
PATCH_GRID = 4
PATCH_SLOTS = 5


def attributes(facts: dict) -> list:
    """The scene as NUM_ATTR_SLOTS small ints (slot layout in the module constants)."""
    fam, scene = facts["family"], facts["scene"]
    a = [FAMILIES.index(fam)]
    if fam == "shapes":
        c = shape_counts(scene)
        a += [c[(col, k)] for col in SHAPE_COLOURS for k in KINDS]
    elif fam == "bars":
        bars = scene["bars"] + [[None, 0]] * (4 - len(scene["bars"]))
        a += [h for _, h in bars] + [0 if col is None else BAR_COLOURS.index(col) + 1 for col, _ in bars]
    else:
        cut = scene["cut"] or {"w": 0, "h": 0, "corner": -1}
        a += [scene["w"], scene["h"], cut["w"], cut["h"], scene["x0"], scene["y0"], cut["corner"] + 1]
    return a + [0] * (NUM_ATTR_SLOTS - len(a))


def _column_bars(scene: dict) -> list:
    """For each patch column c (48-px x in [12c, 12c + 12)), the index of the bar overlapping it
    most (None: no bar). Bar i spans x in [BAR_X0 + BAR_PITCH i, BAR_X0 + BAR_PITCH i + BAR_W)."""
    out = []
    for c in range(PATCH_GRID):
        lo, hi = 12 * c, 12 * c + 12
        ov = [(min(hi, BAR_X0 + BAR_PITCH * i + BAR_W) - max(lo, BAR_X0 + BAR_PITCH * i), i)
              for i in range(len(scene["bars"]))]
        best = max(ov, default=(0, None))
        out.append(best[1] if best[0] > 0 else None)
    return out


def patch_attributes(facts: dict) -> list:
    """PATCH_GRID ** 2 lists of PATCH_SLOTS small ints (< NUM_ATTR_VALUES), one per image patch in
    row-major order (slot layout in the module constants)."""
    fam, scene = facts["family"], facts["scene"]
    fam_id = FAMILIES.index(fam)
    if fam == "grid":
        cut = scene["cut"] or {"w": 0, "h": 0}
        return [[fam_id, scene["w"], scene["h"], cut["w"], cut["h"]] for _ in range(PATCH_GRID ** 2)]
    if fam == "shapes":
        counts = shape_counts(scene)
        per_kind = {k: sum(counts[(c, k)] for c in SHAPE_COLOURS) for k in KINDS}
        at = {cell: (colour, kind) for cell, kind, colour, *_ in scene["shapes"]}
        out = []
        for p in range(PATCH_GRID ** 2):
            if p in at:
                colour, kind = at[p]
                out.append([fam_id, 1 + 3 * SHAPE_COLOURS.index(colour) + KINDS.index(kind),
                            counts[(colour, kind)], per_kind[kind], len(scene["shapes"])])
            else:
                out.append([fam_id, 0, 0, 0, len(scene["shapes"])])
        return out
    heights = [h for _, h in scene["bars"]]
    cols = _column_bars(scene)
    out = []
    for p in range(PATCH_GRID ** 2):
        i = cols[p % PATCH_GRID]
        if i is None:
            out.append([fam_id, 0, 0, 0, len(heights)])
        else:
            colour, h = scene["bars"][i]
            out.append([fam_id, BAR_COLOURS.index(colour) + 1, h, 1 + sum(x > h for x in heights), len(heights)])
    return out


class AttributeHeads(nn.Module):
    """Scene: all patch features -> one classifier per scene-attribute slot (attributes). Patch:
    each patch feature -> one classifier per patch-attribute slot (patch_attributes)."""

    def __init__(self, num_patches: int, width: int):
        super().__init__()
        self.scene = nn.Linear(num_patches * width, NUM_ATTR_SLOTS * NUM_ATTR_VALUES)
        self.patch = nn.Linear(width, PATCH_SLOTS * NUM_ATTR_VALUES)

    def forward(self, feats):                                      # feats [B, P, D], P = g * g patches
        B, P, D = feats.shape
        scene = self.scene(feats.flatten(1)).view(B, NUM_ATTR_SLOTS, NUM_ATTR_VALUES)       # [B, slots, values]
        g, G = int(round(P ** 0.5)), PATCH_GRID
        if g != G:          # another patch grid (a test preset): the world's 4 x 4 cells, nearest patch
            grid = feats.transpose(1, 2).reshape(B, D, g, g)                                 # [B, D, g, g]
            feats = F.interpolate(grid, size=(G, G), mode="nearest").flatten(2).transpose(1, 2)  # [B, 16, D]
        patch = self.patch(feats).view(B, G * G, PATCH_SLOTS, NUM_ATTR_VALUES)              # [B, 16, slots, values]
        return scene, patch

    def loss(self, feats, scene_y, patch_y) -> tuple:
        """Cross-entropy of both heads; returns (loss, scene accuracy (all slots right), patch-slot accuracy)."""
        scene, patch = self(feats)
        loss = (F.cross_entropy(scene.float().flatten(0, 1), scene_y.flatten())
                + F.cross_entropy(patch.float().flatten(0, 2), patch_y.flatten()))
        return loss, (scene.argmax(-1) == scene_y).all(-1).float().mean().item(), \
            (patch.argmax(-1) == patch_y).float().mean().item()
