"""Datasets and the grain input pipeline.

pipeline       config.input defaults, dataset metadata, create_train_iterator / create_eval_dataset
grain_ops      per-example loaders, skip-and-count batching, checked train iterator, eval wrapper
sources        ADE20K / COCO-Stuff raw-folder sources, label tables, checked decoding
synthetic      the procedural, download-free dataset
transforms     resize, random scale-crop, flip, normalisation
tfds_builders  TFDS builders ade20k150 / coco_stuff164k (manual_dir -> ArrayRecord) and reading
classes        class names and visual palettes
"""
