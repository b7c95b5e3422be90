"""Data layer: dictionaries, BPE, image transforms, raw readers, datasets, synthetic scenes."""
