"""Training of the segmentation networks: datasets, losses, augmentation, the loop."""
