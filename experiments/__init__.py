"""Experiments run from the repository root as modules (`python -m experiments.<name>`): the paper's
ablations with seeds (`study`), the RLFSeg demo ablations (`rlfseg_ablations`) and the decoding
order (`decode_order`)."""
