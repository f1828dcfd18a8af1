"""Based linear attention and JRT-RNN's prefix linear attention: one operator family, laid out as in
flash-linear-attention (``fla/ops/based``).

* :mod:`.naive` - the plain quadratic forms with the explicit feature map: the specification and the test
  oracle;
* :mod:`.chunk` - the chunked form (linear in T, differentiable);
* :mod:`.chunk_inference` - the same chunked form for inference: in-place products and features, the division
  fused into the pass and, on a multi-core CPU, independent head blocks on a pool of single-threaded workers
  (no global setting is touched);
* :mod:`.native` - the C++ CPU kernels (``native.cpp``), forward and backward: the chunked algorithm with the
  state in cache and its own register-blocked products, compiled on first use;
* :mod:`.recurrent` - the token loop, the decoding form;
* :mod:`.layout` - the public layout around the internal one, shared by the PyTorch forms and the Triton
  kernels' backward pass;
* :mod:`.api` - the public operators :func:`linear_attention` and :func:`prefix_linear_attention`: input
  checks, padding, and one dispatch table over the forms above and the Triton kernels (:mod:`jrt.ops.triton`).

Every form has one signature, on the internal layout that :mod:`.api` prepares::

    form(q [B, H, T, F], k [B, H, T, F], v1 [B, H, T, Dv+1], state0 [B, H, D, Dv+1] | None,
         encoder (k_enc [B, H, L, F], v1_enc [B, H, L, Dv+1]) | None) -> (o1 [B, H, T, Dv+1], state [B, H, D, Dv+1])

``v1 = [v, 1]`` (the ones column carries the denominator), with the rows of dropped positions (padding;
for the encoder, positions outside the prefix) and their keys set to zero; states are the full map's
``[S | z]`` (``D = 1+F+F^2``); ``o1`` is numerator and denominator before the division.
"""
