"""Detection metrics: PASCAL VOC AP and COCO AP."""
