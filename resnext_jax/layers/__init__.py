"""The model's portable layers: convolution, batch norm and max pooling, each with interchangeable
implementations over one set of parameters. Where our CPU kernels (resnext_jax.cpu) have a faster op for a
layer, the layer asks that package and uses it; everything else here is plain JAX and runs on any backend.
"""
