"""Evaluation of the zoo as the paper did it, and the pictures that show it.

``python -m evaluation sr|style|gallery``: super-resolution scores (``evaluation.sr``), style
transfer against optimisation (``evaluation.style``, with the L-BFGS baseline in
``evaluation.gatys``), and the gallery (``evaluation.gallery``). Metrics live in
``evaluation.metrics`` (PSNR / SSIM) and ``evaluation.lpips``.

Evaluation reuses the trainer's loss network and objective (``training``), so a feed-forward
output and an optimised image are scored by the very function the net was trained on. Nothing
in the serving path imports this package.
"""
