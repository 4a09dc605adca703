"""CMAPKD: cross-modal adaptive pyramid knowledge distillation (seed 004); modules live in submodules."""
