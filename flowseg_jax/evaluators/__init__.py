"""Evaluators: a Segmenter scored on its config's eval split, one per kind of task.

common     this process's share of the split, the sum over processes, eval/<name>.json, `Evaluator`
miou       semantic: mmseg's aAcc / mIoU / mAcc from the confusion matrix scoring.py counts
refer_iou  prompted: gIoU / cIoU / prec@k, the all-background and wrong-prompt figures
Each task names its evaluator (`Task.evaluator`); `evaluate.py` drives it. Evaluators import no
training code and no task: they receive the Segmenter.
"""
