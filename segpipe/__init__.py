"""segpipe: Mask R-CNN instance segmentation at scale.

From Python: ``segpipe.run(...)`` (the whole job), ``segpipe.segment(ds, ...)`` (the model
over a Ray Dataset of yours), ``segpipe.connect(output)`` (the DuckDB views); see
:mod:`segpipe.api`. Importing segpipe imports neither Ray nor torch.
"""

from segpipe.api import connect, run, segment

__version__ = "0.1.0"
__all__ = ["connect", "run", "segment"]
