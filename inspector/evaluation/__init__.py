"""Evaluation of model bundles on labelled image folders (runtime side: numpy/OpenCV, no torch)."""
