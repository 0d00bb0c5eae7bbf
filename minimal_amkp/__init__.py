"""minimal_amkp: attention mining, knowledge preservation and multi-scale aggregation (Cai et al., MICCAI 2018).

The core is the method, read one way: reference/ (the NumPy equations), ops.py and model.py
(torch), classify.py, mine.py and harvest.py (training, the T rounds, the boxes), with
runner.py, loop.py, config.py and classes.py beside them. The shell around it: run/ (the
command, checkpoints, several processes, the report), data/ (ChestX-ray14 files, images, the
phantom) and study/ (Tables 1-3 over seeds). The README's layout section maps every module.
"""
