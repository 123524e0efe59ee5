"""The GPU campaign: train the whole zoo on a lent GPU in one prepared command.

GPU time here is rare, short (about 15 minutes on one H200, at most 10 minutes a command) and
comes without warning, so everything is prepared on the CPU and rehearsed there:

- ``training.gpu.pack``: the data pack (training photos as JPEGs, the style images, the VGG-16
  loss network in bf16), the only data that travels: nothing can be downloaded there and
  ``../shared`` stays behind;
- ``training.gpu.travel``: what travels, measured against the 64 MiB limit;
- ``training.gpu.imports``: which packages the GPU image has, which travel as wheels, and the
  import audit that proves the campaign needs no others;
- ``training.gpu.objective``: each task's loss as a function with no host synchronisation (so
  a whole training step can be captured as one CUDA graph), checked equal to the task's own;
- ``training.gpu.fastloop``: one model on a wall-clock budget, data resident on the device;
- ``training.gpu.campaign``: the stages (the shipped multi-style student continued, or where
  it does not fit a wide teacher and a student distilled from it; x4 and x8 SR, the pixel
  nets continued from the shipped ones), their budgets, and the
  results packed into at most 8 files; ``training.gpu.results`` merges them into the zoo (or
  puts their checkpoints back for a resume).

The commands are ``scripts/gpu_prepare.sh`` (here), ``scripts/gpu_lease.sh`` (there: the
campaign ``scripts/gpu_campaign.sh``, then the serving check ``bench/gpu_check.sh``) and
``scripts/gpu_import.sh`` (here again); the README's "Training on a GPU" section is the
session's script. The CPU trainer (``python -m training``) is unchanged by any of this.
"""
