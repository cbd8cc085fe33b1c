"""lmjax inference: kernels, decoding, sampling and caching for trained models."""
