"""Self-training: a student network learns a label-free teacher's confident voxels.

``settings`` (the teacher, the student in sections, the mode) -> ``student`` (pseudo-labels, the U-Net, its
training, the combination rules: arrays in, arrays out) -> ``method`` (the registered ``selftrain`` method).
"""
