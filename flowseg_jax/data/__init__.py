"""Datasets and the grain input pipeline (no model code: grain workers and TFDS builders import it).

pipeline        config.input defaults, dataset metadata, create_train_iterator / create_eval_dataset
grain_ops       per-example loaders, skip-and-count batching, checked train iterator, eval wrapper
sources         ADE20K / COCO-Stuff raw-folder sources, label tables, checked decoding
folder          your own dataset: a folder of images + PNG masks (mmseg or images/masks layout), classes
hf              the same as a saved Hugging Face `datasets` DatasetDict (the `hf` extra)
listing         image / mask folders listed and paired by stem, with what does not pair
preflight       every mask of a split read before step 1, in threads: bad files named, or counted
synthetic       the procedural, download-free dataset
prompted        (image, prompt, binary mask) examples from any semantic source
refcoco         RefCOCO refs pickles read safely and converted to JSON
refcoco_source  RefCOCO / RefCOCO+ / RefCOCOg as a source of prompted examples
transforms      resize, random scale-crop, flip, normalisation
tfds_builders   TFDS builders ade20k150 / coco_stuff164k (manual_dir -> ArrayRecord) and reading
classes         class names and visual palettes
"""
