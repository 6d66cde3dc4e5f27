"""Everything about seeing: camera sources, detector, tracking, the synthetic scene renderer,
dataset formats, and the training/export wrapper (imported only when training)."""
