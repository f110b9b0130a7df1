"""Offline defect synthesis (issue #9): generators that turn scarce labelled defects into more
training pairs for ARCD. ``dataset.py`` holds what every generator shares: the labelled subset a
generator may learn from, and the writer of the NEU-Seg-layout output that ``inspector train
arcd`` reads (``data.synthetic_root``)."""
