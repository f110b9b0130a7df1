"""Inline steel-strip inspection runtime.

The runtime grabs frames (GenICam camera, replay folder/video, or a synthetic strip), runs a
defect model through an inference engine, turns its output into a defect mask and defect list,
and publishes both over ZeroMQ. It imports and runs without torch.
"""

__version__ = "0.1.0"
