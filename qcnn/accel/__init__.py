"""The speed machinery, apart from the algorithm: each module computes exactly what a plain
torch reference in ``qcnn/`` computes, faster, and is tested against it.

- :mod:`qcnn.accel.rng`: torch's CPU ``rand``/``randn``, bit for bit, from compiled loops
  (reference: ``torch.rand``, ``torch.randn``).
- :mod:`qcnn.accel.estimate`: the estimation and the capped ReLU on CPU as one compiled pass,
  bit for bit (reference: the torch operations of :mod:`qcnn.functional`, ``fused=False``).
- :mod:`qcnn.accel.merge`: the sampling's inverse-CDF walk on CPU, compiled with numba
  (reference: ``torch.searchsorted`` in :mod:`qcnn.sampling`).
- :mod:`qcnn.accel.fused`: the layer's work after the convolution, and the δ noise, as fused
  Triton kernels for CUDA (reference: the torch operations of :mod:`qcnn.functional`).
"""
