"""Rotate (`method: rotate`): QuaRot-style Hadamard rotations and FlatQuant-style learned
affine transforms ahead of low-bit quantization, with fake quantization at W8A8 .. W4A4
(pqk.methods.rotate.method)."""
