"""segpipe: Mask R-CNN instance segmentation at scale."""

__version__ = "0.1.0"
